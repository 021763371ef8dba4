"""Which code produced a result: the git revision of the checkout, or the one baked into an image."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

from nightshift.settings import repo_root


@lru_cache(maxsize=1)
def code_revision() -> str:
    """Return ``<sha>`` or ``<sha>-dirty`` for this checkout, NIGHTSHIFT_CODE_REVISION in images, else ``unknown``."""
    baked = os.environ.get("NIGHTSHIFT_CODE_REVISION")
    if baked:
        return baked
    root = repo_root()
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(value: str) -> str:
    """Return a string usable as a folder name (Airflow run ids hold ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_") or "run"


def printable_line(text: object, limit: int = 1000) -> str:
    """Return ``text`` as one line of printable characters (no control or direction characters), at most
    ``limit`` long: for what a person or another system typed that is shown on a page or kept as a tag."""
    return "".join(ch for ch in " ".join(str(text or "").split()) if ch.isprintable())[:limit]
