"""Checkpoint manifests: written last, checked file by file, and pruned to the newest complete ones."""

from __future__ import annotations

from nightshift.training import checkpoints


def make(root, step, files=None, complete=True):
    folder = root / checkpoints.tag_for(step)
    (folder / "rng").mkdir(parents=True)
    for name, data in (files or {"model.pt": b"m" * 100, "optim.pt": b"o" * 50, "rng/rank0.pt": b"r"}).items():
        (folder / name).write_bytes(data)
    if complete:
        entries = {}
        for rank in range(2):
            entries.update(checkpoints.hash_share(folder, rank, 2))
        checkpoints.write_manifest(folder, entries, {"step": step, "world_size": 2})
    return folder


def test_only_folders_with_a_manifest_are_complete_newest_first(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 10)
    make(tmp_path, 12, complete=False)
    (tmp_path / "step-junk").mkdir()
    assert [c.step for c in checkpoints.complete(tmp_path)] == [10, 2]
    newest = checkpoints.complete(tmp_path)[0]
    assert sorted(newest.manifest["files"]) == ["model.pt", "optim.pt", "rng/rank0.pt"]
    assert not list(tmp_path.rglob(".manifest.json.tmp"))


def test_every_file_is_checked_by_exactly_one_rank(tmp_path):
    folder = make(tmp_path, 4, {f"f{i}": bytes([i]) for i in range(7)})
    names = checkpoints.payload_files(folder)
    shares = [checkpoints.share(names, r, 3) for r in range(3)]
    assert sorted(n for s in shares for n in s) == names


def test_a_changed_truncated_or_missing_file_is_found(tmp_path):
    folder = make(tmp_path, 4)
    checkpoint = checkpoints.complete(tmp_path)[0]
    assert all(checkpoints.verify_share(checkpoint, r, 2) is None for r in range(2))
    (folder / "optim.pt").write_bytes(b"x" * 50)
    problems = [checkpoints.verify_share(checkpoint, r, 2) for r in range(2)]
    assert "optim.pt does not match its checksum" in problems
    (folder / "optim.pt").write_bytes(b"o" * 10)
    assert "optim.pt has 10 bytes, the manifest says 50" in [checkpoints.verify_share(checkpoint, r, 2)
                                                             for r in range(2)]
    (folder / "model.pt").unlink()
    assert "model.pt is missing" in [checkpoints.verify_share(checkpoint, r, 2) for r in range(2)]


def test_prune_keeps_the_newest_complete_and_removes_half_written_folders(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    make(tmp_path, 7, complete=False)
    assert checkpoints.prune(tmp_path, keep=2) == ["step-00000002", "step-00000007"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]


def test_an_unreadable_manifest_makes_a_checkpoint_incomplete(tmp_path):
    folder = make(tmp_path, 8)
    (folder / checkpoints.MANIFEST).write_text("{not json")
    assert checkpoints.complete(tmp_path) == []
