"""Steps of the ingest cycle (collect, prepare, validate, version), Airflow-free.

Steps exchange files in one run folder and return small JSON-friendly dicts for XCom.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightshift.faults import fault_point
from nightshift.prep.recipe import PrepRecipe
from nightshift.quality.suite import QualityPolicy, QualityReport, validate_corpus
from nightshift.records import DatasetVersion
from nightshift.settings import Settings
from nightshift.sources.config import SourceSpec, load_sources, open_source, source_from_uri
from nightshift.sources.document_store import RawDocument, write_raw
from nightshift.versioning.dvc_store import DatasetRepository

log = logging.getLogger(__name__)

RAW = "raw.jsonl"
REPORT = "report.json"
PLAN = "sources.json"
CORPUS = "corpus.jsonl"
COLLECT_SKIPPED = "skipped_collect.json"
SKIPPED = "skipped.json"
PREP_REPORT = "prep.json"


class SourcesUnusable(Exception):
    """Too few sources (or documents) came in for the night to be worth a version."""


class QualityGateFailed(Exception):
    """The prepared corpus failed its Great Expectations suite."""

    def __init__(self, report: QualityReport) -> None:
        super().__init__(f"corpus failed the quality suite: {report.summary()}")
        self.report = report


def dataset_repository(settings: Settings) -> DatasetRepository:
    return DatasetRepository(settings.data_repo, settings.dvc_remote)


def plan_sources(source: str | None, sources_file: Path, allowed_roots: tuple[str, ...],
                 run_dir: Path) -> list[dict[str, Any]]:
    """Return (and record in the run folder) the sources of this run: the one the ``source`` Param names,
    else those of sources.yaml."""
    if source and source.strip():
        specs = [source_from_uri(source, allowed_roots).to_dict()]
    else:
        specs = [spec.to_dict() for spec in load_sources(sources_file)]
    _write_json(run_dir / PLAN, specs)
    return specs


def planned_sources(run_dir: Path) -> list[dict[str, Any]] | None:
    """Return the sources plan_sources recorded for this run, or None when planning did not finish."""
    path = run_dir / PLAN
    return json.loads(path.read_text()) if path.is_file() else None


def collect_source(spec: dict[str, Any], run_dir: Path, state_root: Path,
                   sql_engine: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Read one source into sources/<name>/ of the run folder; return its counts.

    Documents stream to raw.jsonl (ids prefixed with the source's name); the report is written last, so
    its presence says the source was collected completely.
    """
    source = SourceSpec.from_dict(spec)
    out = run_dir / "sources" / source.name
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)
    reader = open_source(source, state_root / source.name, sql_engine)
    formats: Counter[str] = Counter()

    def prefixed():
        for doc in reader.read():
            formats[doc.format] += 1
            yield RawDocument(id=f"{source.name}/{doc.id}", source=doc.source, format=doc.format,
                              content=doc.content, meta=doc.meta)

    documents = write_raw(prefixed(), out / RAW)
    skipped = [{"location": f"{source.name}/{s.location}", "reason": s.reason} for s in reader.skips]
    _write_json(out / COLLECT_SKIPPED, skipped)
    report = {
        "name": source.name, "kind": source.kind, "documents": documents, "formats": dict(sorted(formats.items())),
        "skipped": len(skipped), "skip_reasons": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "details": reader.summary(),
    }
    _write_json(out / REPORT, report)
    log.info("source %s (%s): %d documents, %d skipped %s", source.name, source.kind, documents, len(skipped),
             report["skip_reasons"])
    return report


def merge_sources(run_dir: Path, specs: list[dict[str, Any]], min_source_share: float) -> dict[str, Any]:
    """Combine the collected sources into raw.jsonl; raise SourcesUnusable when too few came in."""
    reports, failed = [], []
    for spec in specs:
        report_path = run_dir / "sources" / spec["name"] / REPORT
        if report_path.is_file():
            reports.append(json.loads(report_path.read_text()))
        else:
            failed.append(spec["name"])
    share = len(reports) / len(specs) if specs else 0.0
    summary = {
        "sources": {r["name"]: {k: r[k] for k in ("kind", "documents", "skipped", "skip_reasons")} for r in reports},
        "failed": failed, "documents": sum(r["documents"] for r in reports),
        "skipped": sum(r["skipped"] for r in reports),
        "skip_reasons": dict(sum((Counter(r["skip_reasons"]) for r in reports), Counter())),
        "formats": dict(sum((Counter(r["formats"]) for r in reports), Counter())),
        "source": ", ".join(s["name"] for s in specs),
    }
    _write_json(run_dir / "collection.json", {**summary, "reports": reports})
    if share < min_source_share or not reports:
        raise SourcesUnusable(
            f"{len(reports)} of {len(specs)} sources collected ({share:.0%}); quality.yaml's min_source_share is "
            f"{min_source_share:.0%}. Failed: {', '.join(failed)}"
        )
    tmp = run_dir / (RAW + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for r in reports:
            with (run_dir / "sources" / r["name"] / RAW).open(encoding="utf-8") as part:
                shutil.copyfileobj(part, out)
    tmp.replace(run_dir / RAW)
    skipped = [s for r in reports for s in json.loads((run_dir / "sources" / r["name"] / COLLECT_SKIPPED).read_text())]
    _write_json(run_dir / COLLECT_SKIPPED, skipped)
    if failed:
        log.warning("sources that failed tonight: %s; the corpus holds the other %d", ", ".join(failed), len(reports))
    return summary


def prepare_corpus(run_dir: Path, recipe: PrepRecipe, cache_path: Path | None,
                   cache_days: float = 7.0) -> dict[str, Any]:
    """Run the preparation recipe over raw.jsonl into corpus.jsonl; write prep.json; return the counts."""
    from nightshift.prep.curate import curate

    report = curate(run_dir / RAW, run_dir / CORPUS, run_dir / "prep", recipe, cache_path, log, cache_days)
    _write_json(run_dir / PREP_REPORT, report.to_dict())
    # Built from collect's own record each time, so a retried step writes the same list, not a longer one.
    skipped = json.loads((run_dir / COLLECT_SKIPPED).read_text()) + [
        {"location": doc_id, "reason": f"{step['step']}: {reason}"}
        for step in report.steps for reason, ids in step["examples"].items() for doc_id in ids
    ]
    _write_json(run_dir / SKIPPED, skipped)
    fault_point("ingest.after_prepare")
    dropped = {s["step"]: sum(s["dropped"].values()) for s in report.steps}
    log.info("preparation: %d in, %d out; dropped per step %s; PII scrubbed %s; contamination %s",
             report.documents_in, report.documents_out, {k: v for k, v in dropped.items() if v}, report.pii,
             {k: v["contaminated"] for k, v in report.contamination.items()})
    return {
        "documents": report.documents_out, "characters": report.characters, "documents_in": report.documents_in,
        "duplicates": dropped.get("exact_dedup", 0), "near_duplicates": dropped.get("near_dedup", 0),
        "dropped": {k: v for k, v in dropped.items() if v}, "pii": report.pii,
        "contamination": {k: v["rate"] for k, v in report.contamination.items()}, "cached": report.cached,
        "prep": report.summary(),
    }


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def needs_publishing(version: DatasetVersion, published: list[dict[str, Any]]) -> bool:
    """Return whether a dataset version still needs its asset event, given the extras of the events so far.

    Decided by the events, not by whether this attempt created the version: an attempt that created the tag
    and died before publishing leaves the retry with an existing tag that was never announced. A version is
    its tag and commit together (a data repository that was created anew reuses tag names).
    """
    return not any((extra or {}).get("dataset_version") == version.tag and (extra or {}).get("rev") == version.rev
                   for extra in published)


def validate(run_dir: Path, policy: QualityPolicy) -> dict[str, Any]:
    """Run the quality suite on corpus.jsonl; raise QualityGateFailed when it fails."""
    report = validate_corpus(run_dir / CORPUS, policy)
    (run_dir / "quality.json").write_text(json.dumps(report.__dict__, indent=2))
    if not report.success:
        raise QualityGateFailed(report)
    return {"evaluated": report.evaluated, "summary": report.summary()}


def version(run_dir: Path, settings: Settings, stats: dict[str, Any], store: str) -> DatasetVersion:
    """Version corpus.jsonl in the data repository; identical bytes return the existing version."""
    meta = {"documents": stats["documents"], "characters": stats["characters"], "duplicates": stats["duplicates"],
            "sources": store, "prep": stats.get("prep", {})}
    return dataset_repository(settings).commit(run_dir / CORPUS, meta)
