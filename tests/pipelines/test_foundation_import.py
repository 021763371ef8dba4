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
