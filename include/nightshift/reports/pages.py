"""HTML pages of the report folder, rendered from the JSON the pipeline steps leave there.

Pages are static files with relative links: the Airflow UI serves them through the nightshift plugin, and
they open from disk just as well. Jinja2 escapes every value (source names and URLs come from outside).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nightshift.reports.store import ReportStore, write_text

TEMPLATES = Path(__file__).resolve().parent / "templates"
INGEST_FILES = ("drop_budget", "collection", "prep", "profile", "drift", "quality", "version")
FINETUNE_FILES = ("training", "evaluation", "decision", "summary")


def _environment():
    from jinja2 import ChainableUndefined, Environment, FileSystemLoader, select_autoescape

    # Optional fields of older reports render as empty rather than failing the page.
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                       undefined=ChainableUndefined, trim_blocks=True, lstrip_blocks=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def render_run(store: ReportStore, dag_id: str, run_id: str) -> Path:
    """(Re)write index.html of a run's report folder from the JSON files present now."""
    folder = store.run_folder(dag_id, run_id)
    ingest = dag_id == "ingest_corpus"
    names = INGEST_FILES if ingest else FINETUNE_FILES
    data: dict[str, Any] = {name: store.read_json(folder / f"{name}.json") for name in names}
    # The documents' validation page is the one people open first; the site's index links the others.
    datadocs = next(iter(sorted((folder / "datadocs").glob("validations/documents/**/*.html"))), None) \
        if ingest else None
    html = _environment().get_template("ingest_run.html" if ingest else "finetune_run.html").render(
        run_id=run_id, dag_id=dag_id, root="../../../", written=_now(),
        datadocs=datadocs.relative_to(folder).as_posix() if datadocs else None, **data,
    )
    return write_text(folder / "index.html", html)


def render_overview(store: ReportStore, champion: int | None = None) -> Path:
    """(Re)write the report root's index.html: dataset versions, model versions and recent alerts."""
    datasets = sorted(store.catalog("datasets"), key=lambda d: str(d.get("tag", "")), reverse=True)
    models = sorted(store.catalog("models"), key=lambda m: int(m.get("version", 0)), reverse=True)
    if champion is None:
        state = store.read_json(store.root / "catalog" / "champion.json", {}) or {}
        champion = state.get("version")
    html = _environment().get_template("overview.html").render(
        datasets=datasets, models=models, alerts=store.alerts(), champion=champion, root="", written=_now(),
    )
    return write_text(store.root / "index.html", html)
