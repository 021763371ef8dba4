import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mlflow_store
from nightshift.registry.mlflow_registry import FINGERPRINT_TAG, IncompleteCheckpoint, ModelRegistry


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(mlflow_store(tmp_path / "mlflow.db"), "test-llm", (tmp_path / "artifacts").as_uri())


def logged_run(registry, tiny_model, key):
    run_id = registry.open_run("exp", key, key, tags={})
    registry.upload_checkpoint(run_id, tiny_model)
    return run_id


def test_open_run_is_idempotent_per_key(registry):
    assert registry.open_run("exp", "k1", "r", {}) == registry.open_run("exp", "k1", "r", {})
    assert registry.open_run("exp", "k1", "r", {}) != registry.open_run("exp", "k2", "r", {})


def test_register_promote_and_find_by_fingerprint(registry, tiny_model, tmp_path):
    assert registry.champion() is None
    run_id = logged_run(registry, tiny_model, "a")
    v1 = registry.register(run_id, tags={FINGERPRINT_TAG: "fp-a", "nightshift.dataset_tag": "corpus-v0001"})
    assert registry.register(run_id, tags={}).version == v1.version == 1  # no duplicate version
    assert registry.find_by_fingerprint("fp-a") is None  # registered, never promoted: not reusable
    assert registry.find_by_fingerprint("fp-a", promoted_only=False).version == 1
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


def upload_in_a_worker_that_dies(registry, run_id, folder, point):
    code = ("import sys; from pathlib import Path; from nightshift.registry.mlflow_registry import ModelRegistry; "
            "r = ModelRegistry(sys.argv[1], 'test-llm', sys.argv[2]); "
            "r.upload_checkpoint(sys.argv[3], Path(sys.argv[4]))")
    proc = subprocess.run([sys.executable, "-c", code, registry.tracking_uri, registry.artifact_root, run_id,
                           str(folder)], env={**os.environ, "NIGHTSHIFT_FAULT": point}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("point", ["registry.mid_upload", "registry.before_manifest"])
def test_a_partial_upload_is_never_registered_and_the_retry_completes_it(registry, tiny_model, tmp_path, point):
    run_id = registry.open_run("exp", "partial", "partial", tags={})
    upload_in_a_worker_that_dies(registry, run_id, tiny_model, point)
    with pytest.raises(IncompleteCheckpoint, match="no manifest"):
        registry.register(run_id, tags={})
    registry.upload_checkpoint(run_id, tiny_model)  # the retry
    version = registry.register(run_id, tags={})
    folder = registry.download(version, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir() if p.name != "MANIFEST.json") == sorted(
        p.name for p in tiny_model.iterdir())


def test_a_download_that_does_not_match_the_manifest_is_refused(registry, tiny_model, tmp_path):
    version = registry.register(logged_run(registry, tiny_model, "tampered"), tags={})
    stored = Path(registry.artifact_root.removeprefix("file://"))
    [weights] = [p for p in stored.rglob("model.safetensors") if version.run_id in str(p)]
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(IncompleteCheckpoint, match="model.safetensors differs"):
        registry.download(version, tmp_path / "cache")
    assert not (tmp_path / "cache" / f"test-llm-v{version.version}").exists()


def test_prune_cache_keeps_only_what_is_asked(registry, tmp_path):
    cache = tmp_path / "cache"
    for name in ("test-llm-v1", "test-llm-v2", "test-llm-v3.partial", "other-model-v1"):
        (cache / name).mkdir(parents=True)
    keep = registry._record(type("MV", (), {"name": "test-llm", "version": "2", "run_id": "r", "source": "s",
                                             "tags": {}, "aliases": []})())
    registry.prune_cache(cache, [keep])
    assert sorted(p.name for p in cache.iterdir()) == ["other-model-v1", "test-llm-v2"]


def test_a_promotion_killed_between_alias_and_record_still_counts_as_promoted(registry, tiny_model):
    version = registry.register(logged_run(registry, tiny_model, "p"), tags={FINGERPRINT_TAG: "fp-p"})
    code = ("import sys; from nightshift.registry.mlflow_registry import ModelRegistry; "
            "r = ModelRegistry(sys.argv[1], 'test-llm', sys.argv[2]); r.promote(r.get(1))")
    proc = subprocess.run([sys.executable, "-c", code, registry.tracking_uri, registry.artifact_root],
                          env={**os.environ, "NIGHTSHIFT_FAULT": "registry.after_alias"}, capture_output=True)
    assert proc.returncode == -9
    assert registry.champion().version == version.version
    assert registry.find_by_fingerprint("fp-p").version == version.version
