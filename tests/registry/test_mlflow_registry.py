import pytest

from nightshift.registry.mlflow_registry import FINGERPRINT_TAG, ModelRegistry


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "test-llm", (tmp_path / "artifacts").as_uri())


def logged_run(registry, tiny_model, key):
    run_id = registry.open_run("exp", key, key, tags={})
    registry.client.log_artifacts(run_id, str(tiny_model), "checkpoint")
    return run_id


def test_open_run_is_idempotent_per_key(registry):
    assert registry.open_run("exp", "k1", "r", {}) == registry.open_run("exp", "k1", "r", {})
    assert registry.open_run("exp", "k1", "r", {}) != registry.open_run("exp", "k2", "r", {})


def test_register_promote_and_find_by_fingerprint(registry, tiny_model, tmp_path):
    assert registry.champion() is None
    run_id = logged_run(registry, tiny_model, "a")
    v1 = registry.register(run_id, tags={FINGERPRINT_TAG: "fp-a", "nightshift.dataset_tag": "corpus-v0001"})
    assert registry.register(run_id, tags={}).version == v1.version == 1  # no duplicate version
    registry.promote(v1)
    champion = registry.champion()
    assert champion.version == 1 and champion.dataset_tag == "corpus-v0001" and "champion" in champion.aliases
    assert registry.find_by_fingerprint("fp-a").version == 1
    assert registry.find_by_fingerprint("fp-b") is None
    folder = registry.download(champion, tmp_path / "cache")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert registry.download(champion, tmp_path / "cache") == folder


def test_params_are_written_once(registry):
    run_id = registry.open_run("exp", "p", "p", {})
    registry.log_params(run_id, {"a": 1})
    registry.log_params(run_id, {"a": 1, "b": 2})  # a retry logs the same params again
    assert registry.client.get_run(run_id).data.params == {"a": "1", "b": "2"}
