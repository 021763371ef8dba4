"""Publish what each step learned into the run's report folder and the catalog, and re-render the pages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.reports.pages import render_overview, render_run
from nightshift.reports.store import ReportStore
from nightshift.settings import Settings
from nightshift.stores import report_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRef:
    """The report folder of one DAG run, as the steps of that run publish into it."""

    settings: Settings
    dag_id: str
    run_id: str

    @property
    def store(self) -> ReportStore:
        return report_store(self.settings)

    @property
    def folder(self) -> Path:
        return self.store.run_folder(self.dag_id, self.run_id)

    @property
    def path(self) -> str:
        """The folder relative to the report root."""
        return ReportStore.run_path(self.dag_id, self.run_id)

    @property
    def url(self) -> str:
        return run_report_url(self.settings, self.dag_id, self.run_id)

    def publish(self, parts: dict[str, Any]) -> Path:
        return publish(self.settings, self.dag_id, self.run_id, parts)

    def publish_tree(self, source: Path, name: str) -> Path:
        """Publish a folder built in the work folder (Data Docs) into the report folder, replacing an older one."""
        return self.store.replace_tree(source, self.folder / name)

    def has_catalog(self, kind: str, key: str) -> bool:
        return any(e.get("tag") == key or str(e.get("version")) == key for e in self.store.catalog(kind))

    def record(self, kind: str, key: str, entry: dict[str, Any], champion: int | None = None) -> Path:
        return record(self.settings, kind, key, entry, champion)


def run_report_url(settings: Settings, dag_id: str, run_id: str) -> str:
    """Return the URL of a run's report page in the Airflow UI."""
    return settings.report_url(f"{ReportStore.run_path(dag_id, run_id)}/index.html")


def publish(settings: Settings, dag_id: str, run_id: str, parts: dict[str, Any]) -> Path:
    """Write ``name.json`` for each part into the run's report folder and re-render its page; return the page."""
    store = report_store(settings)
    folder = store.run_folder(dag_id, run_id)
    for name, data in parts.items():
        store.write_json(folder, f"{name}.json", data)
    return render_run(store, dag_id, run_id)


def record(settings: Settings, kind: str, key: str, entry: dict[str, Any], champion: int | None = None) -> Path:
    """Merge an entry into the catalog (datasets, models) and re-render the overview page."""
    store = report_store(settings)
    store.record(kind, key, entry)
    if champion is not None:
        store.write_json(store.root / "catalog", "champion.json", {"version": champion})
    return render_overview(store)


def record_alert(settings: Settings, alert: dict[str, Any]) -> None:
    """Keep an alert among the recent ones of the overview page (a failure here never stops the alert)."""
    try:
        store = report_store(settings)
        store.add_alert(alert)
        render_overview(store)
    except Exception:  # noqa: BLE001 (the alert itself has been delivered; the page is a convenience)
        log.warning("could not add the alert to the report page", exc_info=True)
