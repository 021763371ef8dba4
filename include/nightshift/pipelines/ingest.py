"""Steps of the ingest cycle (collect, prepare, validate, version), Airflow-free.

Steps exchange files in one run folder and return small JSON-friendly dicts for XCom.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nightshift.faults import fault_point
from nightshift.prep.clean import prepare, write_corpus
from nightshift.quality.suite import QualityPolicy, QualityReport, validate_corpus
from nightshift.records import DatasetVersion
from nightshift.settings import Settings
from nightshift.sources.document_store import read_raw, read_store, resolve_store, write_raw
from nightshift.versioning.dvc_store import DatasetRepository

log = logging.getLogger(__name__)

RAW = "raw.jsonl"
CORPUS = "corpus.jsonl"
COLLECT_SKIPPED = "skipped_collect.json"
SKIPPED = "skipped.json"


class QualityGateFailed(Exception):
    """The prepared corpus failed its Great Expectations suite."""

    def __init__(self, report: QualityReport) -> None:
        super().__init__(f"corpus failed the quality suite: {report.summary()}")
        self.report = report


def dataset_repository(settings: Settings) -> DatasetRepository:
    return DatasetRepository(settings.data_repo, settings.dvc_remote)


def collect(source: str, run_dir: Path, allowed_roots: tuple[Path, ...] | None = None) -> dict[str, Any]:
    """Read the document store into raw.jsonl; return counts by format and skip reason."""
    result = read_store(resolve_store(source, allowed_roots))
    write_raw(result.documents, run_dir / RAW)
    _write_json(run_dir / COLLECT_SKIPPED, [s.__dict__ for s in result.skipped])
    return {
        "source": source,
        "documents": len(result.documents),
        "formats": result.formats,
        "skipped": len(result.skipped),
        "skip_reasons": result.skip_reasons(),
    }


def prepare_corpus(run_dir: Path) -> dict[str, Any]:
    """Clean and exactly deduplicate raw.jsonl into corpus.jsonl; return the counts."""
    result = prepare(read_raw(run_dir / RAW))
    write_corpus(result.documents, run_dir / CORPUS)
    # Built from collect's own record each time, so a retried step writes the same list, not a longer one.
    skipped = json.loads((run_dir / COLLECT_SKIPPED).read_text()) + [s.__dict__ for s in result.skipped]
    _write_json(run_dir / SKIPPED, skipped)
    fault_point("ingest.after_prepare")
    return result.stats()


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
            "store": store}
    return dataset_repository(settings).commit(run_dir / CORPUS, meta)
