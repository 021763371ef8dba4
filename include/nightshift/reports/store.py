"""The report folder: one folder per DAG run with its JSON, charts and pages, a catalog, and recent alerts.

Everything here is written atomically (temporary name, then rename), so a page never shows half a file and a
retried task leaves the same folder an uninterrupted one would. Only this folder is served to the UI.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.provenance import safe_name

ALERTS_KEPT = 200


@dataclass(frozen=True)
class ReportStore:
    """Reports of one installation, under ``root`` (``$NIGHTSHIFT_HOME/reports``)."""

    root: Path

    def run_folder(self, dag_id: str, run_id: str) -> Path:
        """Return (and create) the report folder of one DAG run."""
        folder = self.root / "runs" / safe_name(dag_id) / safe_name(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def run_path(dag_id: str, run_id: str) -> str:
        """Return a run's folder relative to the report root (also its path under the UI's report URL)."""
        return f"runs/{safe_name(dag_id)}/{safe_name(run_id)}"

    def write_json(self, folder: Path, name: str, data: Any) -> Path:
        return write_text(folder / name, json.dumps(data, indent=2, default=_jsonable, sort_keys=True))

    @staticmethod
    def read_json(path: Path, default: Any = None) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return default

    def replace_tree(self, source: Path, target: Path) -> Path:
        """Publish a folder built elsewhere as ``target`` (an older copy is replaced as a whole)."""
        staging = target.with_name(f".{target.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    # The catalog: one small JSON file per dataset version and per model version.
    def record(self, kind: str, key: str, entry: dict[str, Any]) -> Path:
        """Merge ``entry`` into the catalog entry ``kind/key`` (datasets/corpus-v0003, models/7)."""
        path = self.root / "catalog" / kind / f"{safe_name(key)}.json"
        current = self.read_json(path, {}) or {}
        return self.write_json(path.parent, path.name, {**current, **entry})

    def catalog(self, kind: str) -> list[dict[str, Any]]:
        folder = self.root / "catalog" / kind
        entries = [self.read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return [e for e in entries if isinstance(e, dict)]

    def add_alert(self, alert: dict[str, Any]) -> None:
        """Keep an alert (title, severity, where, link; never more) among the recent ones shown in the UI."""
        path = self.root / "alerts.json"
        alerts = (self.read_json(path, []) or [])[-(ALERTS_KEPT - 1):]
        self.write_json(self.root, "alerts.json", [*alerts, alert])

    def alerts(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(reversed((self.read_json(self.root / "alerts.json", []) or [])[-limit:]))


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
