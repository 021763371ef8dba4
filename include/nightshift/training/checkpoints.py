"""Resumable training checkpoints: DeepSpeed's own files, published by a manifest written last.

A checkpoint folder ``step-00000040/`` holds what ``engine.save_checkpoint`` writes (model, optimizer and
scheduler state of every rank), each rank's random-number state, and ``manifest.json``. The manifest is
written after every rank has saved and hashed its share of the files, by an atomic rename: a folder
without one is half-written and never resumed from. Before resuming, the ranks re-hash the files
(each its share) and a checkpoint whose files changed, shrank or went missing is skipped for the one
before it. The manifest also records the loss history up to that step, so a resumed run reports the
same series as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TAG = re.compile(r"step-(\d{8})")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder and what its manifest says."""

    path: Path
    step: int
    manifest: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name


def payload_files(folder: Path) -> list[str]:
    """Return the files of a checkpoint folder (relative, sorted), the manifest excepted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def share(names: list[str], rank: int, world: int) -> list[str]:
    """Return the files rank ``rank`` hashes: every world-th one, so the ranks hash in parallel."""
    return names[rank::world]


def file_entry(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def hash_share(folder: Path, rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {name: file_entry(folder / name) for name in share(payload_files(folder), rank, world)}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Publish a checkpoint: write its manifest under a temporary name, flush it, then rename it into place."""
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w") as fh:
        json.dump({**meta, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / MANIFEST)
    return folder / MANIFEST


def complete(root: Path) -> list[Checkpoint]:
    """Return the checkpoints under ``root`` that have a readable manifest, newest first."""
    found = []
    for folder in Path(root).glob("step-*"):
        match = TAG.fullmatch(folder.name)
        if not match or not (folder / MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            log.warning("checkpoint %s: unreadable manifest, ignored", folder.name)
            continue
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            continue
        found.append(Checkpoint(folder, int(match.group(1)), manifest))
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify_share(checkpoint: Checkpoint, rank: int, world: int) -> str | None:
    """Check this rank's share of a checkpoint's files against its manifest; return the first problem, or None."""
    listed = checkpoint.manifest["files"]
    for name in share(sorted(listed), rank, world):
        path = checkpoint.path / name
        if not path.is_file():
            return f"{name} is missing"
        entry = listed[name]
        if path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if file_entry(path)["sha256"] != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def prune(root: Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest complete checkpoints, and every half-written folder; return their names.

    Called by rank 0 right after a checkpoint is published, when no other save is under way.
    """
    keep_names = {c.tag for c in complete(root)[:keep]}
    removed = []
    for folder in sorted(Path(root).glob("step-*")):
        if folder.name in keep_names or not folder.is_dir():
            continue
        trash = folder.with_name(f".trash-{folder.name}")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)  # out of sight first: a kill during rmtree leaves nothing that looks resumable
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(folder.name)
    return removed
