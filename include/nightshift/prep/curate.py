"""Run a preparation recipe over a night's raw documents: per-document steps, then deduplication over all.

Documents stream through the steps (read, decide, write); only a signature per kept document stays in memory
for near-duplicate detection. The per-document steps run as datatrove pipeline steps on a datatrove executor
(local processes by default, Slurm or Ray per the recipe), each task on one shard of the night, sorted by id.

Every document ends with one outcome: kept (with its final text) or dropped at one step with a reason.
Outcomes are cached by content hash, recipe and the code of the steps (their modules and the libraries they
call), so an unchanged document costs a lookup on the next night and a fixed step redoes every document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from nightshift.faults import fault_point
from nightshift.prep.cache import OutcomeCache
from nightshift.prep.clean import Document, extract_text, normalize_text
from nightshift.prep.recipe import PrepRecipe
from nightshift.prep.shards import Outcome, shard_files, shard_raw
from nightshift.provenance import file_sha256

EXAMPLES = 5
"""Ids of dropped documents kept per reason in the report, never their text."""
SIGNATURE_BATCH_BYTES = 192 * 1024
DECIDE_BATCH_CHARS = 256 * 1024
"""Documents go through the steps in small batches (at most 64 documents or about this many characters)."""
"""Kept documents are hashed for near-duplicate detection in batches of about this many bytes."""


STEP_LIBRARIES = ("trafilatura", "lxml", "justext", "ftfy", "datatrove", "py3langid", "detect-secrets", "rensa",
                  "numpy", "regex")
"""Distributions whose code decides outcomes (extraction, normalisation, filters, language, secrets, hashing);
what they depend on at run time counts too."""
STEP_MODULES: tuple[str, ...] = ("nightshift.extraction",)
"""Modules outside nightshift.prep that decide outcomes; every module of nightshift.prep is included anyway."""


# Characters that code, data and markup use and sentences, keyword spam and gibberish rarely do; links do not
# count (link spam is full of them).
_URL = re.compile(r"\S{0,200}(?:://|www\.)\S{0,2000}")
_CODE_MARKS = frozenset("=(){}[];<>/\\_:@*&^~`\"'")


def _reads_as_code(text: str, prose: str) -> bool:
    """Return whether the part of ``text`` that is not prose reads as code: most of its lines hold a mark of code
    (``=``, brackets, ``/``, ``_``, quotes...) and at most a third of them repeat another."""
    prose_lines = set(prose.splitlines())
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and line not in prose_lines and not line.lstrip().startswith("```")]
    lines = [line.strip("|").strip() for line in lines if set(line) - set("|-: ")]  # table rules carry nothing
    if not lines:
        return False
    marked = sum(1 for line in lines if _CODE_MARKS.intersection(_URL.sub(" ", line)))
    repeated = len(lines) - len(set(lines))
    return marked >= 0.5 * len(lines) and repeated <= len(lines) / 3


def step_sources() -> list[Path]:
    """Return the source files of the code that decides a document's outcome: the steps and this module."""
    import importlib.util

    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    for name in STEP_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise RuntimeError(f"step module {name} not found; fix STEP_MODULES in {__name__}")
        files.append(Path(spec.origin))
    return files


@functools.cache
def code_digest() -> str:
    """Return a hash of the steps' code (source files, library versions, Python and Unicode), once a process."""
    import unicodedata

    h = hashlib.sha256(f"python {sys.version_info[:2]} unicode {unicodedata.unidata_version}\n".encode())
    for path in step_sources():
        # The name, not the folder: the same code installed elsewhere keeps its cache.
        h.update(f"{path.parent.name}/{path.name}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for dist, version in step_library_versions().items():
        h.update(f"{dist}=={version}\0".encode())
    return h.hexdigest()


def step_library_versions() -> dict[str, str]:
    """Return the installed version of every step library and of what each needs at run time, transitively
    (trafilatura's extraction is shaped by courlan, htmldate and charset-normalizer too); "absent" if missing."""
    import importlib.metadata
    import re

    seen: dict[str, str] = {}
    todo = list(STEP_LIBRARIES)
    while todo:
        dist = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if dist in seen:
            continue
        try:
            seen[dist] = importlib.metadata.version(dist)
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            seen[dist] = "absent"
            continue
        for requirement in requires:
            if "extra ==" in requirement or "extra==" in requirement:
                continue
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            if name:
                todo.append(name.group(0))
    return dict(sorted(seen.items()))


def outcome_digest(recipe: PrepRecipe) -> str:
    """Return what, besides a document's content, decides its outcome: the recipe and the steps' code."""
    return hashlib.sha256(f"{recipe.digest()}|{code_digest()}".encode()).hexdigest()


def content_key(fmt: str, content: str, recipe_digest: str) -> str:
    """Return the cache key of a raw document under ``outcome_digest(recipe)``: equal keys get equal outcomes."""
    h = hashlib.sha256(recipe_digest.encode())
    h.update(fmt.encode())
    h.update(b"\0")
    h.update(content.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


DESCRIPTION_WORDS = 3
"""Prose words that make a page of code or tables a reference page (its one-line description) rather than junk."""


class DocumentCurator:
    """Applies the recipe's limits and each document's profile of per-document steps, in order.

    A document's profile is its source's: document ids start with the source's name (``<source>/...``) and
    ``sources`` maps source names to profile names; a source it does not name gets the default profile.

    A step with ``measure: prose`` judges the prose part of the text (nightshift.prep.prose: fenced and indented
    code, markdown tables and signature lines left out), computed once per document, and never changes the text:
    the kept text is the whole document, code and tables included. A document whose prose has fewer than the
    step's ``min_prose_words`` (whitespace) words is judged by its size instead:

    - a reference page, with a line of description (at least ``DESCRIPTION_WORDS`` prose words) and at least
      ``min_prose_words`` words as a whole (a function's signature, its parameter table and examples around a
      one-line description), passes the step: code and tables hold no prose for a ratio to measure, and a docs
      profile exists to keep such pages;
    - any other (a navigation stub, a page of numbers or symbols with no sentence at all) is judged on its whole
      text, as ``measure: all`` would, so the steps' length and ratio rules drop it.

    What is not prose must read as code for the first case (``_reads_as_code``): most of its lines carry the
    punctuation of code, data or markup and few repeat. Spam, gibberish, filler or boilerplate put in a code
    block or a table, or pushed out of the prose by symbols, do not; they are judged on their whole text.
    """

    def __init__(self, recipe: PrepRecipe, sources: Mapping[str, str] | None = None) -> None:
        self.recipe = recipe
        self.sources = dict(sources or {})
        """source name -> profile name."""
        unknown = sorted({p for p in self.sources.values() if p not in recipe.profiles})
        if unknown:
            raise ValueError(f"no preparation profile {unknown}; known profiles: {sorted(recipe.profiles)}")
        self.seconds: Counter[str] = Counter()
        """Time spent per step in this process, for the task log."""
        self._profiles: dict[str, _ProfileSteps] = {}

    def profile_of(self, doc_id: str) -> str:
        """Return the name of the profile that judges the document: its source's, else the default."""
        return self.sources.get(_source_of(doc_id), self.recipe.default_profile)

    def steps_of(self, profile: str) -> _ProfileSteps:
        """Return one profile's steps, built on first use (a profile no document uses costs nothing)."""
        if profile not in self._profiles:
            self._profiles[profile] = _ProfileSteps(self.recipe.profile(profile), self.seconds)
        return self._profiles[profile]

    def process(self, doc_id: str, fmt: str, content: str) -> Outcome:
        """Return the outcome of one raw document; a step that raises drops the document with its reason."""
        return self.process_batch([(doc_id, fmt, content)])[0]

    def process_batch(self, docs: list[tuple[str, str, str]]) -> list[Outcome]:
        """Return the outcomes of a few raw documents (id, format, content), each decided by its profile."""
        groups: dict[str, list[int]] = {}
        for i, (doc_id, _, _) in enumerate(docs):
            groups.setdefault(self.profile_of(doc_id), []).append(i)
        outcomes: list[Outcome] = [Outcome()] * len(docs)
        for profile, members in groups.items():
            decided = self.steps_of(profile).process_batch([docs[i] for i in members])
            for i, outcome in zip(members, decided, strict=True):
                outcomes[i] = outcome
        return outcomes


class _ProfileSteps:
    """One profile's per-document steps, with the filters, scrubber and evaluation index they need."""

    def __init__(self, recipe: PrepRecipe, seconds: Counter[str]) -> None:
        from nightshift.prep.heuristics import QUALITY_STEPS, build_filter

        self.recipe = recipe
        self.seconds = seconds
        self._filters = {s.name: build_filter(s.name, s.config) for s in recipe.steps if s.name in QUALITY_STEPS}
        self._scrubber = None
        self._eval_index = None
        self._prose: dict[int, tuple[str, str, int]] = {}
        """Batch index -> (text, its prose part, prose words), for the text the steps see now."""
        pii = recipe.step("pii")
        if pii is not None:
            from nightshift.prep.pii import Scrubber

            self._scrubber = Scrubber(pii.types)
        decon = recipe.step("decontaminate")
        if decon is not None:
            from nightshift.prep.decontaminate import EvalIndex

            self._eval_index = EvalIndex.build(decon)

    def process_batch(self, docs: list[tuple[str, str, str]]) -> list[Outcome]:
        """Return the outcomes of a few raw documents (id, format, content), each decided on its own.

        Steps run over the batch in recipe order; steps that work on many texts at once (decontamination)
        see all the batch's surviving documents in one call.
        """
        outcomes = [Outcome() for _ in docs]
        texts: dict[int, str] = {}
        self._prose = {}
        limits = self.recipe.limits
        started = time.perf_counter()
        for i, (_, fmt, content) in enumerate(docs):
            reason = None
            if len(content) > limits.max_raw_chars:
                reason = "raw_too_long"
            else:
                try:
                    text = normalize_text(extract_text_of(fmt, content))
                except Exception as exc:  # noqa: BLE001 - a document that breaks extraction is dropped, not the night
                    reason, text = f"extraction_failed:{type(exc).__name__}", ""
                if reason is None:
                    reason = ("empty_after_extraction" if not text else "too_short" if len(text) < limits.min_chars
                              else "too_long" if len(text) > limits.max_chars else None)
            if reason is None:
                texts[i] = text
            else:
                outcomes[i].step, outcomes[i].reason = "limits", reason
        self.seconds["extract"] += time.perf_counter() - started
        for step in self.recipe.steps:
            started = time.perf_counter()
            results = self._run_batch(step.name, step.config, docs, texts, outcomes)
            for i, (reason, text) in results.items():
                if reason is None and not text.strip():
                    reason = "empty_after_step"
                if reason is not None:
                    outcomes[i].step, outcomes[i].reason = step.name, reason
                    del texts[i]
                else:
                    texts[i] = text
            self.seconds[step.name] += time.perf_counter() - started
        for i, text in texts.items():
            outcomes[i].text = text
        self._prose = {}
        return outcomes

    def _run_batch(self, name: str, config: Any, docs: list[tuple[str, str, str]], texts: dict[int, str],
                   outcomes: list[Outcome]) -> dict[int, tuple[str | None, str]]:
        if name == "decontaminate" and texts:
            alive = list(texts)
            try:
                found = self._eval_index.contaminated([texts[i] for i in alive])
            except Exception as exc:  # noqa: BLE001
                return {i: (f"step_failed:{type(exc).__name__}", texts[i]) for i in alive}
            results = {}
            for i, sets in zip(alive, found, strict=True):
                outcomes[i].contaminated = sets
                drop = sets and config.action == "drop"
                results[i] = ("contaminated:" + ",".join(sets) if drop else None, texts[i])
            return results
        results = {}
        for i in list(texts):
            try:
                results[i] = self._run_measured(name, config, i, docs[i][0], texts[i], outcomes[i])
            except Exception as exc:  # noqa: BLE001 - one document's failure is its own drop reason
                results[i] = (f"step_failed:{type(exc).__name__}", texts[i])
        return results

    def _run_measured(self, name: str, config: Any, i: int, doc_id: str, text: str,
                      outcome: Outcome) -> tuple[str | None, str]:
        """Return the step's verdict on the text it measures (see DocumentCurator); prose judging keeps the text."""
        if getattr(config, "measure", "all") != "prose":
            return self._run_step(name, config, doc_id, text, outcome)
        prose, prose_words = self._prose_of(i, text)
        if prose_words >= config.min_prose_words:
            reason, _ = self._run_step(name, config, doc_id, prose, outcome)
        elif (prose_words >= DESCRIPTION_WORDS and len(text.split()) >= config.min_prose_words
              and _reads_as_code(text, prose)):
            return None, text  # a reference page: nothing of prose to judge
        else:
            reason, _ = self._run_step(name, config, doc_id, text, outcome)
        return reason, text

    def _prose_of(self, i: int, text: str) -> tuple[str, int]:
        """Return the prose part of document ``i``'s current text and its word count, computed once per text."""
        cached = self._prose.get(i)
        if cached is None or cached[0] is not text:
            from nightshift.prep.prose import prose_part

            prose = prose_part(text)
            cached = self._prose[i] = (text, prose, len(prose.split()))
        return cached[1], cached[2]

    def _run_step(self, name: str, config: Any, doc_id: str, text: str, outcome: Outcome) -> tuple[str | None, str]:
        if name == "language":
            from nightshift.prep.language import language_verdict

            reason, outcome.language, score = language_verdict(text, config)
            outcome.language_score = round(score, 4)
            return reason, text
        if name in self._filters:
            from nightshift.prep.heuristics import run_filter

            return run_filter(self._filters[name], text, doc_id)
        if name == "pii":
            scrubbed, counts = self._scrubber.scrub(text)
            outcome.pii = dict(sorted(counts.items()))
            return None, scrubbed
        raise ValueError(f"unknown step {name}")


def extract_text_of(fmt: str, content: str) -> str:
    from nightshift.sources.document_store import RawDocument

    return extract_text(RawDocument(id="", source="", format=fmt, content=content))


# ---------------------------------------------------------------------------------------------------------------
# One shard: the datatrove pipeline step every task runs.


class CurateShard(PipelineStep):
    """datatrove step: run the per-document steps on one shard and publish its files."""

    name = "nightshift curate"
    type = "🧹 - PREP"

    def __init__(self, recipe: dict, work_dir: str, cache_path: str | None,
                 sources: dict[str, str] | None = None) -> None:
        super().__init__()
        self.recipe_data = recipe
        self.work_dir = work_dir
        self.cache_path = cache_path
        self.sources = dict(sources or {})

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator:
        from datatrove.utils.logging import logger

        from nightshift.prep.near_dup import MinHasher

        recipe = PrepRecipe.from_dict(self.recipe_data, folder=None)
        digest = outcome_digest(recipe)
        curator = DocumentCurator(recipe, self.sources)
        # A document's outcome depends on its profile only: a profile changed or added elsewhere keeps this cache.
        digests = {name: outcome_digest(recipe.profile(name)) for name in recipe.profiles}
        hasher = MinHasher(recipe.dedup.num_perm, recipe.dedup.ngram, recipe.dedup.seed)
        cache = OutcomeCache(Path(self.cache_path), digest) if self.cache_path else None
        files = shard_files(Path(self.work_dir), rank)
        tmp = {k: p.with_name(p.name + ".tmp") for k, p in files.items()}
        handles = {k: tmp[k].open("w", encoding="utf-8") for k in ("kept", "index", "outcomes", "new_cache")}
        signatures: list[np.ndarray] = []
        pending: list[tuple[str, bytes | None]] = []  # (text, cached signature) of kept docs awaiting signatures
        pending_bytes = 0
        done = hits = 0
        started = last_log = time.monotonic()

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            started_batch = time.perf_counter()
            fresh = [i for i, (_, sig) in enumerate(pending) if sig is None]
            computed = hasher.signatures([pending[i][0] for i in fresh]) if fresh else None
            rows = np.empty((len(pending), recipe.dedup.num_perm), np.uint32)
            for j, (_, sig) in enumerate(pending):
                if sig is not None:
                    rows[j] = np.frombuffer(sig, np.uint32)
            if fresh:
                rows[fresh] = computed
            curator.seconds["signatures"] += time.perf_counter() - started_batch
            signatures.append(rows)
            pending, pending_bytes = [], 0

        try:
            batch: list[tuple[Any, str, str, dict, str, tuple | None]] = []
            batch_chars = 0

            def decide() -> None:
                nonlocal done, hits, last_log, batch, batch_chars
                todo = [(doc.id, fmt, doc.text) for doc, fmt, _, _, _, cached in batch if cached is None]
                fresh = iter(curator.process_batch(todo)) if todo else iter(())
                for doc, fmt, source, raw_meta, key, cached in batch:
                    if cached is not None:
                        outcome, signature = cached
                        hits += 1
                    else:
                        outcome, signature = next(fresh), None
                    write(doc, fmt, source, raw_meta, key, cached is not None, outcome, signature)
                done += len(batch)
                batch, batch_chars = [], 0
                now = time.monotonic()
                if now - last_log >= 30:
                    logger.info(f"task {rank}: {done} documents in {now - started:.0f}s "
                                f"({done / (now - started):.0f}/s), {hits} from the cache")
                    last_log = now

            def write(doc, fmt, source, raw_meta, key, was_cached, outcome, signature) -> None:
                nonlocal pending_bytes
                record = {"id": doc.id, "key": key, "cached": was_cached, "profile": curator.profile_of(doc.id),
                          **asdict(outcome)}
                record.pop("text")
                handles["outcomes"].write(json.dumps(record, ensure_ascii=False) + "\n")
                if outcome.text is not None:
                    text = outcome.text
                    prep_meta = {k: v for k, v in (("language", outcome.language), ("pii", outcome.pii),
                                                   ("contaminated", outcome.contaminated)) if v}
                    kept = Document(doc.id, source, fmt, text, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                                    {**raw_meta, **({"prep": prep_meta} if prep_meta else {})})
                    handles["kept"].write(json.dumps(asdict(kept), ensure_ascii=False, sort_keys=True) + "\n")
                    handles["index"].write(json.dumps({"id": doc.id, "sha256": kept.sha256, "key": key,
                                                       "chars": len(text)}) + "\n")
                    pending.append((text, signature))
                    pending_bytes += len(text)
                    if pending_bytes >= SIGNATURE_BATCH_BYTES:
                        flush()
                if not was_cached:
                    handles["new_cache"].write(json.dumps({"key": key, "outcome": outcome.to_json()}) + "\n")
                self.stat_update("documents")
                self.stat_update("kept" if outcome.text is not None else "dropped")

            for doc in data:
                meta = dict(doc.metadata)
                fmt = str(meta.pop("format", "text"))
                source = str(meta.pop("source", ""))
                raw_meta = meta.pop("meta", {}) or {}
                key = content_key(fmt, doc.text, digests[curator.profile_of(doc.id)])
                batch.append((doc, fmt, source, raw_meta, key, cache.get(key) if cache else None))
                batch_chars += len(doc.text)
                if len(batch) >= 64 or batch_chars >= DECIDE_BATCH_CHARS:
                    decide()
            if batch:
                decide()
            flush()
        finally:
            for fh in handles.values():
                fh.close()
        matrix = np.concatenate(signatures) if signatures else np.empty((0, recipe.dedup.num_perm), np.uint32)
        with tmp["signatures"].open("wb") as fh:
            np.save(fh, matrix)
        fault_point("prep.before_publish")
        for k in ("kept", "index", "signatures", "outcomes", "new_cache"):
            tmp[k].replace(files[k])  # the outcomes file last but one: present only when the task finished
        logger.info(f"task {rank}: {done} documents, {hits} from the cache, {len(matrix)} kept before deduplication; "
                    f"seconds per step {dict((k, round(v, 1)) for k, v in curator.seconds.most_common())}")
        yield from ()


# ---------------------------------------------------------------------------------------------------------------
# The whole night.


@dataclass
class PrepReport:
    """Counts of one preparation run: per step, per reason, per PII type, per evaluation set."""

    documents_in: int = 0
    documents_out: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    """In order: {"step", "in", "out", "dropped": {reason: n}, "examples": {reason: [ids]}}."""
    pii: dict[str, int] = field(default_factory=dict)
    """Placeholders inserted per type, over the documents that were kept."""
    pii_documents: int = 0
    contamination: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per evaluation set: items, documents checked, documents contaminated, rate, action."""
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    cached: int = 0
    characters: int = 0
    seconds: float = 0.0
    executor: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source (the prefix of document ids): {"profile", "in", "out" (in the corpus), "dropped": {step:
    {reason: n}}}, the deduplication steps included; dropped.jsonl lists the ids."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Return the counts kept in a dataset version's metadata (no example ids)."""
        return {
            "documents_in": self.documents_in, "documents_out": self.documents_out,
            "dropped": {s["step"]: s["dropped"] for s in self.steps if s["dropped"]},
            "pii": self.pii, "contamination": {k: {"documents": v["contaminated"], "rate": v["rate"]}
                                               for k, v in self.contamination.items()},
            "near_duplicate_clusters": self.near_duplicates.get("clusters", 0),
        }


def _source_of(doc_id: str) -> str:
    """Return the source of a document: the prefix of its id (collect_source names ids ``<source>/...``)."""
    return doc_id.split("/", 1)[0] if "/" in doc_id else ""


class _StepCounter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = 0
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def drop(self, reason: str, doc_id: str) -> None:
        self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLES:
            ids.append(doc_id)

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.dropped.values())
        return {"step": self.name, "in": self.seen, "out": self.seen - total,
                "dropped": dict(self.dropped.most_common()), "examples": self.examples}


def plan_tasks(recipe: PrepRecipe, raw_bytes: int) -> tuple[int, int]:
    """Return (tasks, workers): one task per 4 MB up to one per worker; small nights run in this process."""
    import os

    workers = recipe.executor.workers or (os.cpu_count() or 1)
    tasks = recipe.executor.tasks or max(1, min(workers, raw_bytes // (4 * 1024 * 1024) + 1))
    return tasks, min(workers, tasks)


def build_pipeline(recipe: PrepRecipe, shards: Path, out: Path, cache_path: Path | None,
                   sources: Mapping[str, str] | None = None) -> list:
    """Return the datatrove pipeline every task runs: read its shard, curate it (``sources``: source -> profile)."""
    from datatrove.pipeline.readers import JsonlReader

    return [
        JsonlReader(str(shards), text_key="content", id_key="id", add_file_path=False, glob_pattern="raw-*.jsonl"),
        CurateShard(recipe.to_dict(), str(out), str(cache_path) if cache_path else None, dict(sources or {})),
    ]


def build_executor(recipe: PrepRecipe, pipeline: list, tasks: int, workers: int, logging_dir: Path):
    """Return the datatrove executor the recipe names, running ``pipeline`` over ``tasks`` shards."""
    kind, options = recipe.executor.kind, dict(recipe.executor.options)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        options.setdefault("time", "04:00:00")
        options.setdefault("job_name", "nightshift-prep")
        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logging_dir), **options)
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logging_dir), **options)
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                 skip_completed=True, **options)


WORKER_START_TIMEOUT_S = 120.0
"""How long a preparation worker may take to start and import the steps before the task fails."""


class WorkerStartError(RuntimeError):
    """The preparation workers cannot start; the message says why and what to change."""


def _worker_ready() -> None:
    """Import every step in a fresh worker, as a preparation task does first (the pool's handshake)."""
    import importlib

    for step in ("clean", "heuristics", "language", "pii", "near_dup", "decontaminate", "cache"):
        importlib.import_module(f"nightshift.prep.{step}")
    fault_point("prep.worker_start")


def _main_module_problem(start_method: str) -> str | None:
    """Return why a new process of this start method cannot import this process's main module, or None."""
    import os

    if start_method == "fork":
        return None
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return None  # started with -m: workers import it by name
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        return None  # an interactive session or -c has nothing to re-import; a script file is re-imported
    return (f"preparation workers cannot start: the {start_method!r} process pool starts each worker by "
            "re-running the main script, and this process's main script has no file (it was read from standard "
            "input, e.g. 'python -', or typed in a console). Run the script from a file, run the DAG through "
            "Airflow or 'airflow dags test', or set executor.workers: 1 in the preparation recipe to prepare "
            "in this process")


def check_workers_start(start_method: str, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
    """Return once a worker of the pool's kind has started and imported the steps; raise WorkerStartError if not.

    datatrove's local executor runs its tasks on a ``multiprocess`` pool, and such a pool replaces a worker that
    dies while starting with another that dies the same way, for ever (each printing its traceback), so one
    worker is started first, alone, and must come up within ``timeout_s``.
    """
    import multiprocess

    problem = _main_module_problem(start_method)
    if problem:
        raise WorkerStartError(problem)
    hint = "Set executor.workers: 1 in the preparation recipe to prepare in this process."
    try:
        proc = multiprocess.get_context(start_method).Process(target=_worker_ready, daemon=True)
        proc.start()
    except Exception as exc:
        raise WorkerStartError(f"preparation workers cannot start: starting a {start_method!r} process failed "
                               f"({type(exc).__name__}: {exc}). {hint}") from exc
    proc.join(timeout_s)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise WorkerStartError(f"preparation workers cannot start: a {start_method!r} worker did not import the "
                               f"steps within {timeout_s:g}s (an overloaded machine, or an import that hangs). "
                               f"{hint}")
    if proc.exitcode != 0:
        raise WorkerStartError(f"preparation workers cannot start: a {start_method!r} worker exited with code "
                               f"{proc.exitcode} while starting (its traceback is printed above; a script that "
                               "prepares must do so under 'if __name__ == \"__main__\":', as every worker re-runs "
                               f"it). {hint}")


WORKER_POLL_S = 0.5
"""How often the pool's processes are checked while the preparation tasks run."""
LOST_TASK_GRACE_S = 2.0
"""How long a run may take to end after one of its processes died before that process's task counts as lost."""
SHUTDOWN_GRACE_S = 30.0
"""The same for an exit the pool itself causes when it stops (code 0 or SIGTERM): it ends the run shortly after."""


class WorkerDied(RuntimeError):
    """A preparation worker died while the tasks ran, so its task's result will never come; the message says why."""


def _death_reason(exitcode: int | None) -> str:
    """Return how a process ended, in words, with what to do about it."""
    import signal

    if exitcode is None or exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = "unknown signal"
    reason = f"was killed by signal {-exitcode} ({name})"
    if -exitcode == signal.SIGKILL:
        reason += (", most often by the out-of-memory killer: lower executor.workers or raise executor.tasks "
                   "(smaller shards) in the preparation recipe, or give the task more memory")
    return reason


def run_supervised(executor, poll_s: float = WORKER_POLL_S) -> None:
    """Run a local executor's process pool; return when it ends, or raise WorkerDied when a process dies under it.

    A ``multiprocess`` pool replaces a worker that dies (the out-of-memory killer's SIGKILL, a crash in a native
    library) and waits for ever for the dead worker's result, so the run is watched from here: a process of the
    run that ends while the run does not is a lost task. The pool is then stopped and the task fails; a retry
    resumes, as finished tasks are kept and a task's partial files are rewritten from the start.
    """
    import signal
    import threading

    import multiprocess
    from multiprocess.connection import wait

    before = set(multiprocess.active_children())
    done = threading.Event()
    failed: list[BaseException] = []

    def target() -> None:
        try:
            executor.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=target, name="nightshift-prep-executor", daemon=True)
    watched: list = []
    dead: dict = {}  # process -> when it was seen dead
    thread.start()
    try:
        while not done.wait(poll_s):
            watched += [p for p in multiprocess.active_children() if p not in before and p not in watched]
            alive = {_sentinel(p): p for p in watched if p not in dead}
            alive.pop(None, None)
            # Waiting on sentinels reads no exit status, which the pool's own thread collects for its workers.
            for sentinel in wait(list(alive), timeout=0):
                dead[alive[sentinel]] = time.monotonic()
            now = time.monotonic()
            for proc, since in dead.items():
                waited = now - since
                if waited < LOST_TASK_GRACE_S:
                    # Its exit status is not read before: the pool's own thread reads its workers' first, and a
                    # second reader at the same moment would find it gone.
                    continue
                if waited >= SHUTDOWN_GRACE_S or proc.exitcode not in (0, -signal.SIGTERM):
                    raise WorkerDied(
                        f"preparation process {proc.name} (pid {proc.pid}) {_death_reason(proc.exitcode)}. Its "
                        "task's result is lost, so the other tasks were stopped; a retry resumes from the tasks "
                        "that finished")
    except BaseException as exc:
        _stop_run(watched, before, exc, done)
        raise
    if failed:
        raise failed[0]


def _sentinel(proc) -> int | None:
    """Return the handle that becomes ready when ``proc`` ends, or None once it was closed."""
    try:
        return proc.sentinel
    except ValueError:
        return None


def _stop_run(watched: list, before: set, error: BaseException, done) -> None:
    """Stop the run that ``error`` interrupted: fail the pool's pending results, then kill what is left.

    The pool is found by its workers: datatrove keeps it in a local variable. Handing its pending results an
    error is what the pool itself does for a task that raised, so datatrove's own clean-up (stopping the pool's
    workers and its manager) then runs as it does for a failed task.
    """
    import gc

    import multiprocess
    from multiprocess.pool import Pool

    procs = [*watched, *(p for p in multiprocess.active_children() if p not in before and p not in watched)]
    pids = {p.pid for p in procs}
    pools = [o for o in gc.get_objects() if isinstance(o, Pool) and pids & {w.pid for w in getattr(o, "_pool", ())}]
    stop = RuntimeError(f"preparation stopped: {type(error).__name__}")  # its own object: one traceback each
    for pool in pools:
        for job in list(getattr(pool, "_cache", {}).values()):
            try:
                job._set(0, (False, stop))
            except Exception:  # noqa: BLE001, S112 - a pool of another shape is terminated below instead
                continue
    if done.wait(10):
        return
    for pool in pools:
        pool.terminate()
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def curate(raw: Path, corpus: Path, work: Path, recipe: PrepRecipe, cache_path: Path | None = None,
           log=None, cache_days: float = 7.0, sources: Mapping[str, str] | None = None) -> PrepReport:
    """Prepare raw.jsonl into corpus.jsonl under a recipe; return the report. Re-running resumes finished tasks.

    ``sources`` maps source names (the prefix of document ids) to the profile that judges their documents;
    the others get the recipe's default profile.
    """
    import logging

    log = log or logging.getLogger(__name__)
    started = time.monotonic()
    raw_bytes = raw.stat().st_size
    sources = dict(sorted((sources or {}).items()))
    DocumentCurator(recipe, sources)  # an unknown profile fails here, before any work
    tasks, workers = plan_tasks(recipe, raw_bytes)
    # Outputs are named by what decides them, so a retry resumes finished tasks and a changed input starts anew.
    digest = hashlib.sha256(f"{outcome_digest(recipe)}|{file_sha256(raw)}|{tasks}|{json.dumps(sources)}"
                            .encode()).hexdigest()[:16]
    run = work / digest
    shards = run / "raw"
    if not all((shards / f"raw-{i:05d}.jsonl").is_file() for i in range(tasks)):
        shard_raw(raw, shards, tasks)
    out = run / "out"
    out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(recipe, shards, out, cache_path, sources)
    log.info("preparing %d bytes of raw documents in %d task(s) on %d worker(s) (%s executor)",
             raw_bytes, tasks, workers, recipe.executor.kind)
    executor = build_executor(recipe, pipeline, tasks, workers, run / "logs")
    if recipe.executor.kind == "local" and executor.workers > 1:  # one worker runs the tasks in this process
        check_workers_start(executor.start_method)
        run_supervised(executor)
    else:
        executor.run()
    if recipe.executor.kind == "slurm":  # the jobs were submitted; wait for them (the task's timeout bounds this)
        while incomplete := executor.get_incomplete_ranks(range(tasks)):
            log.info("waiting for %d of %d preparation tasks on Slurm", len(incomplete), tasks)
            time.sleep(30)
    missing = [r for r in range(tasks) if not shard_files(out, r)["outcomes"].is_file()]
    if missing:
        raise RuntimeError(f"preparation tasks {missing} did not finish; see their logs under {run / 'logs'}")
    report = _finish(out, tasks, corpus, recipe, json.loads((shards / "empty.json").read_text()))
    report.seconds = round(time.monotonic() - started, 2)
    report.executor = {"kind": recipe.executor.kind, "tasks": tasks, "workers": workers}
    if cache_path is not None:

        cache = OutcomeCache(cache_path, outcome_digest(recipe))
        cache.absorb(out, tasks)
        pruned = cache.prune(cache_days * 86400)
        if pruned:
            log.info("outcome cache: removed %d outcomes no night used for %g days", pruned, cache_days)
    # The corpus is published: the shards (a copy of the night each) go; a retry starts over, from the cache.
    shutil.rmtree(run, ignore_errors=True)
    log.info("prepared %d of %d documents in %.1fs (%d from the cache)", report.documents_out, report.documents_in,
             report.seconds, report.cached)
    return report


def _finish(out: Path, tasks: int, corpus: Path, recipe: PrepRecipe, empty: list[str]) -> PrepReport:
    """Count outcomes, remove exact and near duplicates over all shards, and write the corpus in id order.

    Every dropped document gets a line in dropped.jsonl beside the corpus: id, step and reason.
    """
    from nightshift.prep.near_dup import find_near_duplicates

    report = PrepReport()
    counters = {"limits": _StepCounter("limits")}
    for steps in (recipe.steps, *recipe.profiles.values()):  # the default profile's order first
        for step in steps:
            counters.setdefault(step.name, _StepCounter(step.name))
    order = list(counters)
    orders = {name: ["limits", *(s.name for s in steps)] for name, steps in recipe.profiles.items()}
    by_source: dict[str, dict[str, Any]] = {}

    def count_source(doc_id: str, profile: str | None, step: str | None = None, reason: str | None = None) -> None:
        entry = by_source.setdefault(_source_of(doc_id), {"profile": profile, "in": 0, "out": 0, "dropped": {}})
        if profile is not None:
            entry["in"] += 1
            entry["out"] += 1
        if step is not None:
            entry["out"] -= 1
            reasons = entry["dropped"].setdefault(step, {})
            reasons[reason] = reasons.get(reason, 0) + 1
    contaminated: Counter[str] = Counter()
    checked = 0
    dropped_path = corpus.with_name("dropped.jsonl")
    dropped_tmp = dropped_path.with_name(dropped_path.name + ".tmp")
    dropped_log = dropped_tmp.open("w", encoding="utf-8")

    def record(doc_id: str, step: str, reason: str) -> None:
        dropped_log.write(json.dumps({"id": doc_id, "step": step, "reason": reason}, ensure_ascii=False) + "\n")

    for doc_id in empty:
        report.documents_in += 1
        counters["limits"].seen += 1
        counters["limits"].drop("empty", doc_id)
        record(doc_id, "limits", "empty")
        count_source(doc_id, recipe.default_profile, "limits", "empty")
    for rank in range(tasks):
        with shard_files(out, rank)["outcomes"].open(encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                report.documents_in += 1
                report.cached += bool(o["cached"])
                stop = o["step"]
                profile_order = orders[o.get("profile", recipe.default_profile)]
                count_source(o["id"], o.get("profile", recipe.default_profile))
                for name in profile_order:
                    counters[name].seen += 1
                    if name == stop:
                        counters[name].drop(o["reason"], o["id"])
                        record(o["id"], name, o["reason"])
                        count_source(o["id"], None, name, o["reason"])
                        break
                if "decontaminate" in profile_order and (
                        stop is None or profile_order.index(stop) >= profile_order.index("decontaminate")):
                    checked += 1
                for name in o["contaminated"]:
                    contaminated[name] += 1

    ids: list[str] = []
    hashes: list[str] = []
    for rank in range(tasks):
        with shard_files(out, rank)["index"].open(encoding="utf-8") as fh:
            for line in fh:
                entry = json.loads(line)
                ids.append(entry["id"])
                hashes.append(entry["sha256"])
    signatures = [np.load(shard_files(out, r)["signatures"]) for r in range(tasks)]
    matrix = np.concatenate(signatures) if signatures else np.empty((0, recipe.dedup.num_perm), np.uint32)

    drop: dict[int, str] = {}
    exact = _StepCounter("exact_dedup")
    exact.seen = len(ids)
    if recipe.dedup.exact:
        first: dict[str, int] = {}
        for i, digest in enumerate(hashes):
            if digest in first:
                drop[i] = "exact_duplicate"
                exact.drop("exact_duplicate", ids[i])
                count_source(ids[i], None, "exact_dedup", "exact_duplicate")
                record(ids[i], "exact_dedup", f"exact_duplicate:{ids[first[digest]]}")
            else:
                first[digest] = i
    near = _StepCounter("near_dedup")
    near.seen = len(ids) - len(drop)
    if recipe.dedup.near:
        remaining = np.array([i for i in range(len(ids)) if i not in drop], dtype=np.int64)

        def texts_of(rows: list[int]) -> list[str]:
            # Only documents of candidate pairs are read back, from the kept files, to verify them exactly.
            wanted = {int(remaining[r]) for r in rows}
            found: dict[int, str] = {}
            index = 0
            for rank in range(tasks):
                with shard_files(out, rank)["kept"].open(encoding="utf-8") as fh:
                    for line in fh:
                        if index in wanted:
                            found[index] = json.loads(line)["text"]
                        index += 1
            return [found[int(remaining[r])] for r in rows]

        clusters = find_near_duplicates(matrix[remaining], recipe.dedup.threshold, texts_of, recipe.dedup.ngram)
        for local, keep in clusters.duplicate_of.items():
            i = int(remaining[local])
            drop[i] = "near_duplicate"
            near.drop("near_duplicate", ids[i])
            count_source(ids[i], None, "near_dedup", "near_duplicate")
            record(ids[i], "near_dedup", f"near_duplicate:{ids[int(remaining[keep])]}")
        report.near_duplicates = {"clusters": clusters.clusters, "removed": len(clusters.duplicate_of),
                                  "candidate_pairs": clusters.candidate_pairs,
                                  "verified_pairs": clusters.verified_pairs, "threshold": recipe.dedup.threshold}
    report.steps = [counters[n].to_dict() for n in order] + [exact.to_dict(), near.to_dict()]
    report.sources = dict(sorted(by_source.items()))
    dropped_log.close()

    pii: Counter[str] = Counter()
    tmp = corpus.with_name(corpus.name + ".tmp")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    index = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as dst:
        for rank in range(tasks):
            with shard_files(out, rank)["kept"].open(encoding="utf-8") as fh:
                for line in fh:
                    if index not in drop:
                        dst.write(line)
                        doc = json.loads(line)
                        report.documents_out += 1
                        report.characters += len(doc["text"])
                        found = doc["meta"].get("prep", {}).get("pii", {})
                        if found:
                            pii.update(found)
                            report.pii_documents += 1
                    index += 1
    dropped_tmp.replace(dropped_path)
    tmp.replace(corpus)
    report.pii = dict(sorted(pii.items()))
    decon = recipe.step("decontaminate")
    if decon is not None:
        from nightshift.prep.decontaminate import read_items

        for name in sorted(decon.sets):
            n = contaminated[name]
            report.contamination[name] = {
                "items": len(read_items(decon.set_path(name))), "checked": checked, "contaminated": n,
                "rate": round(n / checked, 6) if checked else 0.0, "action": decon.action,
            }
    return report
