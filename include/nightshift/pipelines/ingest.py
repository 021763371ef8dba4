"""Steps of the ingest cycle (collect, prepare, validate, version), Airflow-free.

Steps exchange files in one run folder and return small JSON-friendly dicts for XCom.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from nightshift.faults import fault_point
from nightshift.prep.recipe import PrepRecipe
from nightshift.quality.suite import DropBudget, QualityPolicy, QualityReport, validate_corpus
from nightshift.records import DatasetVersion
from nightshift.reports.publish import RunRef
from nightshift.settings import Settings
from nightshift.sources.config import SourceSpec, load_sources, open_source, source_from_uri
from nightshift.sources.document_store import RawDocument, write_raw
from nightshift.stores import dataset_repository

log = logging.getLogger(__name__)

RAW = "raw.jsonl"
REPORT = "report.json"
PLAN = "sources.json"
CORPUS = "corpus.jsonl"
COLLECT_SKIPPED = "skipped_collect.json"
SKIPPED = "skipped.json"
PREP_REPORT = "prep.json"
ID_KEY = ".id_key"
"""The per-installation key of the hashes in scrubbed ids, under the sources' state root (created once)."""


class SourcesUnusable(Exception):
    """Too few sources (or documents) came in for the night to be worth a version."""


class QualityGateFailed(Exception):
    """The prepared corpus failed its Great Expectations suite."""

    def __init__(self, report: QualityReport) -> None:
        super().__init__(f"corpus failed the quality suite: {report.summary()}")
        self.report = report


def plan_sources(source: str | None, sources_file: Path, allowed_roots: tuple[str, ...],
                 run_dir: Path, profiles: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Return (and record in the run folder) the sources of this run: the one the ``source`` Param names,
    else those of sources.yaml. A source naming a preparation profile outside ``profiles`` is refused."""
    if source and source.strip():
        specs = [source_from_uri(source, allowed_roots).to_dict()]  # no `prep`: the default profile
    else:
        specs = [spec.to_dict() for spec in load_sources(sources_file)]
    if profiles is not None:
        for spec in specs:
            if spec.get("prep") is not None and spec["prep"] not in profiles:
                raise ValueError(f"source {spec['name']}: no preparation profile {spec['prep']!r}; known profiles: "
                                 f"{', '.join(sorted(profiles))} (include/configs/prep/<name>.yaml)")
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
    its presence says the source was collected completely. Ids, sources, meta values and skipped locations are
    scrubbed here, before anything is written: every later file, version, report and alert sees only the
    scrubbed forms. A scrubbed part of an id keeps a keyed hash of the original (the key lives in
    ``state_root``), so ids stay unique and stable from night to night without naming anyone.
    """
    from nightshift.prep.pii import identifier_key, scrub_identifier

    source = SourceSpec.from_dict(spec)
    out = run_dir / "sources" / source.name
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)
    key = identifier_key(state_root / ID_KEY)
    reader = open_source(source, state_root / source.name, sql_engine)
    formats: Counter[str] = Counter()

    def scrub(value: str) -> str:
        return scrub_identifier(value, key)

    def prefixed():
        for doc in reader.read():
            formats[doc.format] += 1
            yield RawDocument(id=f"{source.name}/{scrub(doc.id)}", source=scrub(doc.source), format=doc.format,
                              content=doc.content, meta=_scrub_tree(doc.meta, scrub))

    documents = write_raw(prefixed(), out / RAW)
    skipped = [{"location": f"{source.name}/{scrub(s.location)}", "reason": scrub(s.reason)} for s in reader.skips]
    _write_json(out / COLLECT_SKIPPED, skipped)
    report = {
        "name": source.name, "kind": source.kind, "documents": documents, "formats": dict(sorted(formats.items())),
        "skipped": len(skipped), "skip_reasons": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "details": _scrub_tree(reader.summary(), scrub),
    }
    _write_json(out / REPORT, report)
    log.info("source %s (%s): %d documents, %d skipped %s", source.name, source.kind, documents, len(skipped),
             report["skip_reasons"])
    return report


def _scrub_tree(value: Any, scrub: Callable[[str], str]) -> Any:
    """Return a JSON-like value with every string in it (keys included) scrubbed, one string at a time."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: _scrub_tree(v, scrub) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_tree(v, scrub) for v in value]
    return value


def merge_sources(run_dir: Path, specs: list[dict[str, Any]], min_source_share: float,
                  run: RunRef | None = None) -> dict[str, Any]:
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
    if run:
        run.publish({"collection": summary})
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
                   cache_days: float = 7.0, run: RunRef | None = None) -> dict[str, Any]:
    """Run the preparation recipe over raw.jsonl into corpus.jsonl; write prep.json; return the counts."""
    from nightshift.prep.curate import curate

    profiles = {s["name"]: s["prep"] for s in planned_sources(run_dir) or [] if s.get("prep")}
    unknown = sorted(f"{name} ({profile})" for name, profile in profiles.items() if profile not in recipe.profiles)
    if unknown:
        raise ValueError(f"sources name preparation profiles the recipe lacks: {', '.join(unknown)}; known profiles: "
                         f"{', '.join(sorted(recipe.profiles))}")
    report = curate(run_dir / RAW, run_dir / CORPUS, run_dir / "prep", recipe, cache_path, log, cache_days,
                    profiles)
    _write_json(run_dir / PREP_REPORT, report.to_dict())
    # Built from collect's own record each time, so a retried step writes the same list, not a longer one.
    skipped = json.loads((run_dir / COLLECT_SKIPPED).read_text()) + [
        {"location": doc_id, "reason": f"{step['step']}: {reason}"}
        for step in report.steps for reason, ids in step["examples"].items() for doc_id in ids
    ]
    _write_json(run_dir / SKIPPED, skipped)
    if run:
        run.publish({"prep": {**report.to_dict(), "steps": [{k: v for k, v in step.items() if k != "examples"}
                                                             for step in report.steps]}})
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


def validate(run_dir: Path, policy: QualityPolicy, stats: dict[str, Any] | None = None,
             run: RunRef | None = None) -> dict[str, Any]:
    """Run the quality suite on corpus.jsonl; raise QualityGateFailed when it fails.

    With ``run``, the validation is rendered as Great Expectations Data Docs into the run's report folder.
    """
    collection = json.loads((run_dir / "collection.json").read_text()) if (run_dir / "collection.json").is_file() \
        else {}
    # A feedback source brings what people approved, or nothing, and preparation may drop all of it (a
    # correction in another language, an evaluation item pasted as a correction): no minimum applies to it.
    sources = {name: s["documents"] for name, s in collection.get("sources", {}).items()
               if s.get("kind") != "feedback"} or None
    stats = stats or {}
    prepared = stats.get("documents", 0) + stats.get("near_duplicates", 0)
    near_share = stats.get("near_duplicates", 0) / prepared if prepared else 0.0
    staging = run_dir / "datadocs"
    shutil.rmtree(staging, ignore_errors=True)
    report = validate_corpus(run_dir / CORPUS, policy, sources, near_share, staging if run else None)
    _write_json(run_dir / "quality.json", report.__dict__)
    if run:
        run.publish_tree(staging, "datadocs")
        run.publish({"quality": report.__dict__})
    if not report.success:
        raise QualityGateFailed(report)
    return {"evaluated": report.evaluated, "summary": report.summary()}


def version(run_dir: Path, settings: Settings, stats: dict[str, Any], store: str,
            drift: dict[str, Any] | None = None, run: RunRef | None = None) -> DatasetVersion:
    """Version corpus.jsonl (with its whylogs profile) in the data repository; identical bytes return the existing
    version."""
    meta = {"documents": stats["documents"], "characters": stats["characters"], "duplicates": stats["duplicates"],
            "sources": store, "prep": stats.get("prep", {})}
    if drift:
        meta["drift"] = {k: drift[k] for k in ("status", "drifted", "possibly_drifted", "references") if k in drift}
    profile = run_dir / PROFILE
    companions = {PROFILE: profile} if profile.is_file() else None
    dataset = dataset_repository(settings).commit(run_dir / CORPUS, meta, companions)
    if run:
        run.publish({"version": dataset.to_dict()})
        entry = {"tag": dataset.tag, "documents": dataset.documents, "md5": dataset.md5, "bytes": dataset.bytes,
                 "documents_in": stats.get("documents_in"), "quality": "passed"}
        if dataset.created or not run.has_catalog("datasets", dataset.tag):
            drift = drift or {}
            entry.update({"run_id": run.run_id, "report": run.path, "drift": drift.get("status", "not_compared"),
                          "drifted": drift.get("drifted", [])})
        run.record("datasets", dataset.tag, entry)
    return dataset


PROFILE = "profile.bin"


def index_corpus(run_dir: Path, settings: Settings, dataset: DatasetVersion, run: RunRef | None = None) -> dict:
    """Index the version's documents for retrieval (retrieval.yaml; NIGHTSHIFT_VECTOR_STORE); return the counts:
    chunks, ``embedded`` now and ``cached`` from earlier nights. An index already stored is kept."""
    from nightshift.embeddings import embedder
    from nightshift.retrieval.cache import EmbeddingCache
    from nightshift.retrieval.config import RetrievalConfig
    from nightshift.retrieval.indexing import build_index
    from nightshift.retrieval.store import open_store

    config = RetrievalConfig.load(settings.retrieval_config)
    if not config.enabled:
        return {"skipped": "retrieval.yaml says enabled: false", "tag": dataset.tag, "chunks": 0, "engine": None}
    store = open_store(settings.vector_store, settings.home, config)
    model = embedder()
    cache = EmbeddingCache(settings.cache_dir / "embeddings" / "chunks.sqlite", model.key, model.dimensions)
    from nightshift.versioning.dvc_store import content_md5

    corpus = run_dir / CORPUS
    if not corpus.is_file() or content_md5(corpus) != dataset.md5:  # the index is of the version's own bytes
        corpus = dataset_repository(settings).fetch(dataset, run_dir / "versioned.jsonl")
    fault_point("ingest.index")
    stats = build_index(corpus, dataset.tag, store, model, cache, config)
    if run:
        run.publish({"index": stats})
    return stats


class DriftBlocked(Exception):
    """The new corpus drifted from its reference and drift.yaml says drift blocks the run."""


def drift_references(settings: Settings, policy: Any, corpus_md5: str,
                     champion_data: str | None = None) -> list[tuple[str, str]]:
    """Return (reference, tag) pairs to compare a new corpus with: the previous version, the champion's data.

    ``champion_data`` is the dataset version the champion model was trained on, as its promotion announced it.
    """
    repo = dataset_repository(settings)
    refs: list[tuple[str, str]] = []
    if not (settings.data_repo / ".dvc").is_dir():
        return refs
    md5s = {tag: repo.get(tag).md5 for tag in repo.versions()}  # oldest first
    if "previous" in policy.references:
        # The newest version with other bytes: an unchanged night is compared with what came before it.
        previous = next((t for t in reversed(md5s) if md5s[t] != corpus_md5), None)
        if previous:
            refs.append(("previous", previous))
    # A corpus is not compared with itself: a champion trained on these very bytes is no reference.
    if "champion" in policy.references and champion_data in md5s and md5s[champion_data] != corpus_md5:
        refs.append(("champion", champion_data))
    return refs


def profile_corpus(run_dir: Path, settings: Settings, policy: Any, run: RunRef,
                   champion_data: str | None = None) -> dict[str, Any]:
    """Profile corpus.jsonl with whylogs, compare it with its references, publish charts; return the drift verdict.

    Writes profile.bin (versioned with the corpus) into the run folder. Raises DriftBlocked when drift.yaml
    blocks on drift.
    """
    import time

    from nightshift.monitoring.drift import compare, not_compared, worst
    from nightshift.monitoring.profiles import (
        TokenCounter,
        corpus_metrics,
        profile_frame,
        read_profile,
        summarize,
        write_profile,
    )
    from nightshift.reports import charts
    from nightshift.settings import DEFAULT_FOUNDATION_MODEL
    from nightshift.versioning.dvc_store import content_md5

    started = time.monotonic()
    collection = json.loads((run_dir / "collection.json").read_text())
    kinds = {r["name"]: r["kind"] for r in collection.get("reports", [])}
    counter = TokenCounter(settings.models_dir / DEFAULT_FOUNDATION_MODEL / "tokenizer.json", policy.token_sample)
    metrics = corpus_metrics(run_dir / CORPUS, kinds, counter)
    view = profile_frame(metrics.frame)
    write_profile(view, run_dir / PROFILE)
    summary = summarize(view)
    log.info("profiled %d documents in %.1f s (tokens counted on %d)", summary["documents"], metrics.seconds,
             metrics.tokenized)

    folder = run.folder
    chart_dir = folder / "charts"
    profile_charts = []
    for name in ("chars", "words", "tokens", "lines"):
        column = summary["columns"].get(name, {})
        if column.get("histogram"):
            file = charts.histogram_svg(column["histogram"], f"{name} per document", name, chart_dir / f"{name}.svg")
            profile_charts.append({"file": f"charts/{file.name}", "title": f"{name} per document"})
    for name in ("language", "source", "kind"):
        column = summary["columns"].get(name, {})
        if column.get("top"):
            file = charts.shares_svg(column["top"], column["n"], f"documents by {name}", chart_dir / f"{name}.svg")
            profile_charts.append({"file": f"charts/{file.name}", "title": f"documents by {name}"})
    # The very bytes that will be versioned (a profile serialized twice differs in its sketch's layout).
    shutil.copyfile(run_dir / PROFILE, folder / (PROFILE + ".tmp"))
    (folder / (PROFILE + ".tmp")).replace(folder / PROFILE)

    comparisons = []
    md5 = content_md5(run_dir / CORPUS)
    refs = drift_references(settings, policy, md5, champion_data)
    for reference, tag in refs:
        raw = dataset_repository(settings).read_companion(tag, PROFILE)
        if raw is None:
            comparisons.append(not_compared(reference, tag, f"{tag} was versioned without a profile").to_dict())
            continue
        result = compare(view, read_profile(raw), policy, reference, tag).to_dict()
        result["charts"] = []
        for name, metric in result["metrics"].items():
            file = charts.drift_svg(metric.pop("shape"), f"{name}: {metric['category']}", "this corpus", tag,
                                    chart_dir / f"drift-{reference}-{name}.svg")
            result["charts"].append({"file": f"charts/{file.name}", "title": name})
        comparisons.append(result)
    if not refs:
        comparisons.append(not_compared("previous", "", "no earlier dataset version to compare with").to_dict())
    status = worst([c["status"] for c in comparisons])
    drifted = sorted({m for c in comparisons for m in c["drifted"]})
    possibly = sorted({m for c in comparisons for m in c["possibly_drifted"]} - set(drifted))
    blocked = policy.block and status == "drift"
    drift = {"status": status, "drifted": drifted, "possibly_drifted": possibly, "blocked": blocked,
             "comparisons": comparisons, "seconds": round(time.monotonic() - started, 2)}
    profile = {"summary": summary, "charts": profile_charts, "tokenized": metrics.tokenized,
               "tokenizer": metrics.tokenizer, "seconds": round(metrics.seconds, 2)}
    run.publish({"profile": profile, "drift": drift})
    log.info("drift: %s%s (%.1f s for profile and drift)", status,
             f", drifted: {', '.join(drifted)}" if drifted else "", drift["seconds"])
    alert = (status == "drift" and policy.alert_on in ("drift", "possible_drift")) or \
        (status == "possible_drift" and policy.alert_on == "possible_drift")
    if blocked:
        tags = ", ".join(c["reference_tag"] for c in comparisons if c["status"] == "drift")
        raise DriftBlocked(f"the corpus drifted from {tags} in {', '.join(drifted)}; drift.yaml blocks on drift")
    return {"status": status, "drifted": drifted, "possibly_drifted": possibly, "alert": alert,
            "documents": summary["documents"], "seconds": drift["seconds"],
            "references": {c["reference"]: c["reference_tag"] for c in comparisons if c["reference_tag"]}}


DROPPED = "dropped.jsonl"
"""Written by preparation beside the corpus: one line per dropped document (id, step, reason)."""
DROP_BUDGET = "drop_budget.json"
DROP_EXAMPLES = 5
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")
"""Deduplication reasons carry the kept copy's id after a colon; they are counted without it."""


class DropBudgetExceeded(Exception):
    """A preparation step dropped more of one source than quality.yaml's drop_budget allows, and the budget blocks."""


def drop_budget(run_dir: Path, budget: DropBudget, run: RunRef | None = None) -> dict[str, Any]:
    """Judge what each preparation step dropped of each source against the budget; return the verdict.

    A source's documents are counted as they entered preparation (collection.json); its drops are read from
    dropped.jsonl by id prefix. The verdict is written to drop_budget.json and published into the run's report
    (shown first on the page when a step is over budget). Raises DropBudgetExceeded afterwards when the budget
    blocks. Only ids (scrubbed at collection), step names, reasons and counts appear, never document text.
    """
    entered = _documents_entering(run_dir)
    drops = _drops_by_source(run_dir / DROPPED)
    checked: dict[str, dict[str, Any]] = {}
    exceeded: list[dict[str, Any]] = []
    for source in sorted(set(entered) | set(drops)):
        documents = entered.get(source, 0)
        steps = drops.get(source, {})
        judged = documents >= budget.min_documents
        checked[source] = {"documents": documents, "judged": judged,
                           "dropped": {step: d["dropped"] for step, d in steps.items()}}
        if not judged:
            continue
        for step, d in steps.items():
            share = d["dropped"] / documents
            if share > budget.max_share:
                exceeded.append({"source": source, "step": step, "dropped": d["dropped"], "documents": documents,
                                 "share": round(share, 4), "reasons": dict(d["reasons"].most_common()),
                                 "examples": d["examples"]})
    exceeded.sort(key=lambda e: (-e["share"], e["source"], e["step"]))
    blocked = bool(exceeded) and budget.block
    verdict = {"exceeded": exceeded, "checked": checked, "max_share": budget.max_share,
               "min_documents": budget.min_documents, "block": budget.block, "blocked": blocked,
               "summary": drop_budget_summary(exceeded, budget.max_share)}
    _write_json(run_dir / DROP_BUDGET, verdict)
    if run:
        run.publish({"drop_budget": verdict})
    if exceeded:
        log.warning("drop budget: %s", verdict["summary"].replace("\n", "; "))
    if blocked:
        raise DropBudgetExceeded(f"{verdict['summary']}\nquality.yaml's drop_budget blocks: no dataset version")
    return verdict


def drop_budget_summary(exceeded: list[dict[str, Any]], max_share: float, reasons: int = 3) -> str:
    """Return one line per step over budget: source, step, share, top reasons with counts, example ids."""
    lines = []
    for e in exceeded:
        top = ", ".join(f"{reason} {n}" for reason, n in list(e["reasons"].items())[:reasons])
        lines.append(f"{e['source']}: {e['step']} dropped {e['dropped']} of {e['documents']} documents "
                     f"({e['share']:.0%}, budget {max_share:.0%}); reasons: {top}; e.g. {', '.join(e['examples'])}")
    return "\n".join(lines)


def _documents_entering(run_dir: Path) -> dict[str, int]:
    """Return each collected source's documents as they entered preparation (raw.jsonl is their concatenation)."""
    collection = json.loads((run_dir / "collection.json").read_text())
    return {name: int(s["documents"]) for name, s in collection.get("sources", {}).items()}


def _drops_by_source(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Return source -> step -> {dropped, reasons (Counter), examples} from dropped.jsonl, streamed."""
    drops: dict[str, dict[str, dict[str, Any]]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            # Ids are "<source>/<id in the source>" and source names hold no slash (sources.config.NAME).
            source = str(row["id"]).split("/", 1)[0]
            reason = str(row["reason"])
            head = reason.split(":", 1)[0]
            entry = drops.setdefault(source, {}).setdefault(
                row["step"], {"dropped": 0, "reasons": Counter(), "examples": []})
            entry["dropped"] += 1
            entry["reasons"][head if head in DUPLICATE_REASONS else reason] += 1
            if len(entry["examples"]) < DROP_EXAMPLES:
                entry["examples"].append(str(row["id"]))
    return drops


def drop_budget_alert(verdict: dict[str, Any], report: RunRef, task_id: str):
    """Return the warning alert for a drop budget exceeded without blocking, or None when none was."""
    from nightshift.alerts.channels import Alert

    if not verdict["exceeded"]:
        return None
    names = ", ".join(sorted({e["source"] for e in verdict["exceeded"]}))
    return Alert(title=f"drop budget exceeded in {names}",
                 message=f"{verdict['summary']}\nThe run continues; see the top of the report page.",
                 severity="warning", dag_id=report.dag_id, run_id=report.run_id, task_id=task_id,
                 report_url=report.url)


def drift_alert(drift: dict[str, Any], report: RunRef, task_id: str):
    """Return the warning alert for a corpus that drifted beyond drift.yaml's thresholds, or None."""
    from nightshift.alerts.channels import Alert

    if not drift["alert"]:
        return None
    names = ", ".join(drift["drifted"] or drift["possibly_drifted"])
    return Alert(title=f"corpus drift ({drift['status']}) in {names}",
                 message=f"The new corpus differs from {', '.join(drift['references'].values())} in {names} "
                 "beyond drift.yaml's thresholds. The run continues; see the report's drift charts.",
                 severity="warning", dag_id=report.dag_id, run_id=report.run_id, task_id=task_id,
                 report_url=report.url)
