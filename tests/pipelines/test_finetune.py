import pytest

from nightshift.pipelines.finetune import FinetuneRequest, fingerprint, resolve_dataset
from nightshift.training.recipe import TrainingRecipe


@pytest.fixture
def two_versions(tmp_path, monkeypatch):
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    repo = dataset_repository(settings)
    corpus = tmp_path / "c.jsonl"
    for text in ("one\n", "two\n"):
        corpus.write_text(text)
        repo.commit(corpus, {"documents": 1})
    return settings


def test_dataset_resolution_order(two_versions):
    assert resolve_dataset(two_versions, "corpus-v0001", [{"dataset_version": "corpus-v0002"}]).tag == "corpus-v0001"
    assert resolve_dataset(two_versions, None, [{"dataset_version": "corpus-v0001"}]).tag == "corpus-v0001"
    assert resolve_dataset(two_versions, None, []).tag == "corpus-v0002"
    with pytest.raises(LookupError, match="corpus-v0042"):
        resolve_dataset(two_versions, "corpus-v0042", [])


def test_no_dataset_yet_says_to_run_ingest(tmp_path, monkeypatch):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    with pytest.raises(LookupError, match="run the ingest_corpus DAG first"):
        resolve_dataset(load_settings(), None, [])


def test_fingerprint_tracks_data_base_bytes_recipe_world_size_and_trainer_code(two_versions, monkeypatch):
    import nightshift.pipelines.finetune as finetune

    v1 = resolve_dataset(two_versions, "corpus-v0001", [])
    v2 = resolve_dataset(two_versions, "corpus-v0002", [])
    base = fingerprint(v1, "d1", TrainingRecipe(), 2)
    assert base == fingerprint(v1, "d1", TrainingRecipe(), 2)
    variants = {base, fingerprint(v2, "d1", TrainingRecipe(), 2), fingerprint(v1, "d2", TrainingRecipe(), 2),
                fingerprint(v1, "d1", TrainingRecipe(train_steps=21), 2), fingerprint(v1, "d1", TrainingRecipe(), 4)}
    monkeypatch.setattr(finetune, "trainer_code_digest", lambda: "changed trainer")
    variants.add(fingerprint(v1, "d1", TrainingRecipe(), 2))
    assert len(variants) == 6


def test_the_base_model_is_known_by_its_bytes_not_its_name(tmp_path):
    from nightshift.pipelines.finetune import checkpoint_digest

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    first = checkpoint_digest(model, tmp_path / "cache")
    assert checkpoint_digest(model, tmp_path / "cache") == first
    renamed = model.rename(tmp_path / "same-bytes-other-name")
    assert checkpoint_digest(renamed, tmp_path / "cache") == first
    (renamed / "model.safetensors").write_bytes(b"other weights")
    assert checkpoint_digest(renamed, tmp_path / "cache") != first


def test_request_validates_backend_and_applies_overrides():
    with pytest.raises(ValueError, match="backend must be"):
        FinetuneRequest("m", None, None, "slurm")
    recipe = FinetuneRequest("m", 3, 1e-4, "local").load_recipe()
    assert (recipe.train_steps, recipe.learning_rate) == (3, 1e-4)


def test_the_report_says_why_the_run_trained(two_versions):
    from nightshift.pipelines.finetune_tasks import why_it_ran
    from nightshift.pipelines.run import Run

    def reason(extras, by="ada"):
        return why_it_ran(Run(two_versions, "finetune_model", "r1", by, tuple(extras)))

    drift = "monitor_model, hour to 2026-12-01T10:00+00:00: prompts drifted (ROC AUC 0.91)"
    assert reason([{"dataset_version": "corpus-v0001"}, {"dataset_version": "corpus-v0002", "reason": drift}]) \
        == drift
    assert reason([{"dataset_version": "corpus-v0002"}], "schedule") == "a new corpus version was published"
    hostile = "<b>drift</b>\x00\x1b[31m\u202e" + "z" * 2000  # an event another producer wrote: one printable line
    assert reason([{"reason": hostile}]) == "<b>drift</b>[31m" + "z" * 984
    assert reason([]) == "started by ada"
