"""Retention: work folders of old runs go; what a run in progress or the registry still needs stays."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)


def prune_work_dirs(dag_work_dir: Path, retention_days: float, keep: Path | None = None) -> list[Path]:
    """Remove run folders under ``dag_work_dir`` untouched for ``retention_days``; return what was removed."""
    if not dag_work_dir.is_dir():
        return []
    cutoff = time.time() - retention_days * 86400
    removed = []
    for folder in sorted(dag_work_dir.iterdir()):
        if not folder.is_dir() or (keep is not None and folder.resolve() == keep.resolve()):
            continue
        newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
        if max(newest, folder.stat().st_mtime) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d work folders older than %g days under %s", len(removed), retention_days, dag_work_dir)
    return removed
