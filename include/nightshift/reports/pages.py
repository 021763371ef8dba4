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
INGEST_FILES = ("drop_budget", "collection", "prep", "profile", "drift", "quality", "version", "index")
FINETUNE_FILES = ("training", "evaluation", "decision", "summary", "retrieval")


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


def render_monitoring(store: ReportStore, hours: list[dict[str, Any]], incidents: list[dict[str, Any]],
                      policy: dict[str, Any]) -> Path:
    """(Re)write monitoring.html: per version and hour, traffic, latency, errors, feedback and prompt drift, and
    the incidents still open. ``hours`` are monitor_model's hour summaries (counts and scores only)."""
    from nightshift.reports.charts import hourly_svg

    charts = store.root / "monitoring"
    charts.mkdir(parents=True, exist_ok=True)

    def per_version(key: str) -> dict[str, list[tuple[str, float | None]]]:
        out: dict[str, list[tuple[str, float | None]]] = {}
        for hour in hours:
            for version, stats in hour.get("versions", {}).items():
                out.setdefault(f"v{version}", []).append((hour["hour"], stats.get(key)))
        return out

    bands: dict[str, list[tuple[str, float, float]]] = {}
    negative: dict[str, list[tuple[str, float | None]]] = {}
    for hour in hours:
        feedback = hour.get("feedback") or {}
        for side in ("champion", "previous"):
            entry = feedback.get(side)
            if entry and entry.get("ratings"):
                label = f"v{entry['version']}"
                negative.setdefault(label, []).append((hour["hour"], entry["negative_share"]))
                bands.setdefault(label, []).append((hour["hour"], entry["low"], entry["high"]))
    drift = {"prompts": [(h["hour"], (h.get("drift") or {}).get("auc")) for h in hours]}
    near = {side: [(h["hour"], ((h.get("drift") or {}).get("corpus_similarity") or {}).get(key)) for h in hours]
            for side, key in (("this hour", "current"), ("reference", "reference"))}
    figures = [
        ("traffic", hourly_svg(per_version("answers"), "answers per hour", "answers", charts / "traffic.svg")),
        ("latency p95", hourly_svg(per_version("p95_seconds"), "p95 latency", "seconds", charts / "p95.svg")),
        ("latency p50", hourly_svg(per_version("p50_seconds"), "median latency", "seconds", charts / "p50.svg")),
        ("errors", hourly_svg(per_version("error_rate"), "share of answers that failed", "share",
                              charts / "errors.svg", threshold=policy.get("max_error_rate"))),
        ("negative feedback", hourly_svg(negative, "share of raters voting down (Wilson interval)", "share",
                                         charts / "feedback.svg", bands=bands)),
        ("prompt drift", hourly_svg(drift, "prompt drift: classifier ROC AUC against the reference", "ROC AUC",
                                    charts / "drift.svg", threshold=policy.get("auc_threshold"))),
        ("prompts vs training data", hourly_svg(near, "prompts vs the champion's training data: nearest document",
                                                "cosine similarity", charts / "corpus.svg")),
    ]
    html = _environment().get_template("monitoring.html").render(
        hours=list(reversed(hours))[:48], incidents=incidents, root="", written=_now(),
        figures=[(name, path.relative_to(store.root).as_posix()) for name, path in figures],
    )
    return write_text(store.root / "monitoring.html", html)


def render_leaderboard(store: ReportStore, board: dict[str, Any] | None) -> Path:
    """(Re)write leaderboard.html: select_foundation_model's ranking (``board``, json-safe: NaN as strings), its
    intervals against the base, and charts of quality, quality against cost, and latency."""
    import math

    from nightshift.evaluation.metrics import CATALOG
    from nightshift.reports.charts import candidates_figure, latency_figure, quality_cost_figure

    def number(value: Any) -> float:
        return float(value) if isinstance(value, (int, float)) else math.nan

    figures: list[tuple[str, str]] = []
    comparisons: dict[str, dict[str, Any]] = {}
    golden_items = 0
    if board:
        rank_by = board["rank_by"]
        spec = CATALOG[rank_by]
        for row in board["rows"]:
            comparisons[row["name"]] = {c["metric"]: {k: number(v) if k in ("difference", "low", "high") else v
                                                      for k, v in c.items()} for c in row["comparisons"]}
        rows = [(r["name"], *(number(comparisons[r["name"]].get(rank_by, {}).get(k, 0.0 if r["base"] else math.nan))
                              for k in ("difference", "low", "high"))) for r in board["rows"]]
        figures.append((f"{rank_by} against the base", candidates_figure(
            [r for r in rows if not math.isnan(r[1])], rank_by, spec.higher_is_better, board["confidence"])))
        points = [(r["name"], number(r["cost"].get("per_1k_tokens")), number(r["metrics"].get(rank_by)),
                   r["kind"] == "api") for r in board["rows"]]
        figures.append((f"{rank_by} against cost", quality_cost_figure(
            [p for p in points if not (math.isnan(p[1]) or math.isnan(p[2]))], rank_by)))
        figures.append(("latency", latency_figure([(r["name"], number(r["latency"]["mean_s"]),
                                                    number(r["latency"]["p95_s"])) for r in board["rows"]])))
        golden_items = max((len(r.get("examples", [])) for r in board["rows"]), default=0)
        board = {**board, "rows": [{**r, "metrics": {k: number(v) for k, v in r["metrics"].items()},
                                    "cost": {**r["cost"], "per_1k_tokens": number(r["cost"].get("per_1k_tokens"))}}
                                   for r in board["rows"]]}
    shown = [m for m in (board or {}).get("metrics", [])
             if any(not math.isnan(number(r["metrics"].get(m))) for r in board["rows"])]
    hidden = [m for m in (board or {}).get("metrics", []) if m not in shown]
    why = next((r["unmeasured"].get(m) or r.get("judge", {}).get("note") for r in (board or {}).get("rows", [])
                for m in hidden if r["unmeasured"].get(m) or r.get("judge", {}).get("note")), "")
    html = _environment().get_template("leaderboard.html").render(
        board=board, comparisons=comparisons, figures=figures, shown=shown, hidden=hidden, hidden_why=why,
        golden_items=board.get("golden_items", golden_items) if board else 0, root="", written=_now())
    return write_text(store.root / "leaderboard.html", html)
