"""Importing a base model is a task with limits: only a folder under the installation's roots, only a checkpoint's
own files (no code, no pickles, no links), loaded and answered before it is moved in; a retry keeps it, another
model under the same name is refused; the choice is kept with who, when and why."""

import shutil

import pytest

from nightshift.pipelines.foundation import import_checkpoint


def test_a_checkpoint_is_copied_checked_and_kept_once(tmp_path, tiny_model):
    source = tmp_path / "export"
    shutil.copytree(tiny_model, source)
    (source / "modeling_custom.py").write_text("raise SystemExit('remote code')\n")
    (source / "training_args.bin").write_bytes(b"pickle")
    (source / "extra.json").symlink_to("/etc/hostname")
    models = tmp_path / "models"
    models.mkdir()
    first = import_checkpoint(source, models / "imported", (tmp_path,))
    assert first["new"] and (models / "imported" / "model.safetensors").is_file()
    copied = {p.name for p in (models / "imported").iterdir()}
    assert not {"modeling_custom.py", "training_args.bin", "extra.json"} & copied
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert import_checkpoint(source, models / "imported", (tmp_path,))["new"] is False  # a retry
    (source / "config.json").write_text((source / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(FileExistsError, match="another model is already named imported"):
        import_checkpoint(source, models / "imported", (tmp_path,))


def test_what_is_not_a_checkpoint_under_the_roots_is_refused(tmp_path, tiny_model):
    models = tmp_path / "models"
    with pytest.raises(PermissionError, match="not under a folder this installation reads from"):
        import_checkpoint(tiny_model, models / "x", (tmp_path / "elsewhere",))
    with pytest.raises(ValueError, match="absolute folder"):
        import_checkpoint(tmp_path.relative_to(tmp_path.parent), models / "x", (tmp_path,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint folder"):
        import_checkpoint(tmp_path / "empty", models / "x", (tmp_path,))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    models.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error: the weights do not load
        import_checkpoint(broken, models / "x", (tmp_path,))
    assert not (models / "x").exists() and not list(models.iterdir())


@pytest.fixture
def home(tmp_path, monkeypatch):
    from helpers import mlflow_store
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return settings


def board(base, *names):
    return {"base": base, "recommended": names[0], "rank_by": "golden.token_f1",
            "rows": [{"name": n, "kind": "local", "metrics": {"golden.token_f1": 0.5}} for n in names]}


def test_choices_keep_who_and_why_refuse_a_stale_board_and_ignore_forged_records(home):
    import json

    from nightshift.pipelines.foundation import CHOICE_TAG, EXPERIMENT, choices, current_base, record_choice
    from nightshift.pipelines.run import Run
    from nightshift.settings import DEFAULT_FOUNDATION_MODEL
    from nightshift.stores import registry_for

    base = DEFAULT_FOUNDATION_MODEL
    adopt = {"approved": True, "by": "ada", "reason": "better answers", "candidate": "b"}
    first = record_choice(home, Run(home, "select_foundation_model", "r1"), board(base, base, "b"), adopt)
    assert (first["base"], first["previous"], first["changed"]) == ("b", base, True)
    # A retry of the same run records nothing new.
    assert record_choice(home, Run(home, "select_foundation_model", "r1"), board(base, base, "b"), adopt)["id"] == \
        first["id"]
    # A board another run made against the old base cannot undo the choice unseen.
    with pytest.raises(ValueError, match=f"compared the candidates with {base}, but the base is b now"):
        record_choice(home, Run(home, "select_foundation_model", "r0"), board(base, base, "c"),
                      {**adopt, "candidate": "c"})
    kept = record_choice(home, Run(home, "select_foundation_model", "r2"), board("b", "b", "c"),
                         {"approved": False, "by": "timeout", "reason": "", "candidate": None})
    assert kept["kept"] and kept["base"] == "b" and kept["reason"] == "no answer within the form's time"
    assert [c["base"] for c in choices(home)] == ["b", "b"] and current_base(home) == "b"
    # Records nightshift did not write, or dated ahead of now, never decide the base.
    client = registry_for(home).client
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    client.set_experiment_tag(experiment, CHOICE_TAG + "forged1", "[]")
    client.set_experiment_tag(experiment, CHOICE_TAG + "forged2", json.dumps({"at": "9999-01-01T00:00:00+00:00",
                                                                             "base": "evil"}))
    client.set_experiment_tag(experiment, CHOICE_TAG + "forged3", json.dumps({"at": "2026-12-31T00:00:00+00:00",
                                                                             "base": "../../etc"}))
    assert current_base(home) == "b" and len(choices(home)) == 2


def test_the_bundled_import_never_writes_over_another_model_and_names_are_unique(home, tiny_model):
    from nightshift.evaluation.leaderboard import ApiCandidate, FoundationConfig
    from nightshift.pipelines.foundation import import_base, plan

    shutil.copytree(tiny_model, home.models_dir / "mine")
    with pytest.raises(FileExistsError, match="another model is already named mine"):
        import_base(home, "bundled", "mine")
    assert (home.models_dir / "mine" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="import_as must be"):
        import_base(home, "/x", "../escape")
    shutil.copytree(tiny_model, home.models_dir / "SmolLM2-135M-Instruct")  # stands in for the base
    clash = FoundationConfig(api=(ApiCandidate("mine", "c"),))
    with pytest.raises(ValueError, match="API candidate mine has the name of a local model folder"):
        plan(home, clash, None)
    planned = plan(home, FoundationConfig(api=(ApiCandidate("hosted", "c"),)), None)
    assert [(c["name"], c["kind"], c["base"]) for c in planned] == [
        ("SmolLM2-135M-Instruct", "local", True), ("mine", "local", False), ("hosted", "api", False)]
