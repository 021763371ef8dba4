"""One DAG run as the steps of a pipeline see it, Airflow-free: the settings, the run's ids, who started it, what
triggered it; its work folder and report folder follow from those."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.provenance import safe_name
from nightshift.reports.publish import RunRef
from nightshift.settings import Settings


@dataclass(frozen=True)
class Run:
    settings: Settings
    dag_id: str
    run_id: str
    started_by: str = "unknown"
    """The user who triggered the run, else ``schedule`` (or the run type)."""
    event_extras: tuple[dict[str, Any], ...] = field(default=())
    """The extras of the asset events that triggered the run, oldest first."""

    @property
    def key(self) -> str:
        """``<dag_id>/<run_id>``: the run's name in the registry's tags and the promotion history."""
        return f"{self.dag_id}/{self.run_id}"

    @property
    def report(self) -> RunRef:
        """The run's report folder, which its steps publish into."""
        return RunRef(self.settings, self.dag_id, self.run_id)

    def work_dir(self) -> Path:
        """Return (and create) the run's work folder."""
        path = self.settings.work_dir / self.dag_id / safe_name(self.run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path
