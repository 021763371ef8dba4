"""One shard of a night: the datatrove pipeline step every preparation task runs.

A task reads its shard (raw documents sorted by id), looks each up in the outcome cache, decides the others
with the curator in small batches, writes kept documents, outcomes and near-duplicate signatures to files of
its own, and renames them into place only when it ends: a task killed at any line leaves nothing half-written,
and a retry rewrites its files from the start.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from nightshift.faults import fault_point
from nightshift.prep.cache import OutcomeCache
from nightshift.prep.clean import Document
from nightshift.prep.curator import DocumentCurator
from nightshift.prep.digests import content_key, outcome_digest
from nightshift.prep.recipe import PrepRecipe
from nightshift.prep.shards import Outcome, shard_files

DECIDE_BATCH_DOCS = 64
DECIDE_BATCH_CHARS = 256 * 1024
"""Documents go through the steps in small batches (at most ``DECIDE_BATCH_DOCS`` documents or about this many
characters)."""
SIGNATURE_BATCH_BYTES = 192 * 1024
"""Kept documents are hashed for near-duplicate detection in batches of about this many bytes."""
PROGRESS_EVERY_S = 30.0
"""How often a task logs how far it got."""


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

        recipe = PrepRecipe.from_dict(self.recipe_data, folder=None)
        shard = _Shard(recipe, self.sources, Path(self.work_dir), rank, self.cache_path, self.stat_update)
        try:
            for doc in data:
                shard.add(doc)
                if shard.progress_due():
                    logger.info(shard.progress())
            shard.decide()
            shard.flush_signatures()
        finally:
            shard.close()
        kept = shard.publish()
        logger.info(f"task {rank}: {shard.done} documents, {shard.hits} from the cache, {kept} kept before "
                    f"deduplication; dropped per step {shard.curator.dropped()}; seconds per step "
                    f"{dict((k, round(v, 1)) for k, v in shard.curator.seconds.most_common())}")
        yield from ()


def build_pipeline(recipe: PrepRecipe, shards: Path, out: Path, cache_path: Path | None,
                   sources: Mapping[str, str] | None = None) -> list:
    """Return the datatrove pipeline every task runs: read its shard, curate it (``sources``: source -> profile)."""
    from datatrove.pipeline.readers import JsonlReader

    return [
        JsonlReader(str(shards), text_key="content", id_key="id", add_file_path=False, glob_pattern="raw-*.jsonl"),
        CurateShard(recipe.to_dict(), str(out), str(cache_path) if cache_path else None, dict(sources or {})),
    ]


class _Shard:
    """The state of one task: its open files, the batch awaiting the steps, the signatures awaiting hashing."""

    def __init__(self, recipe: PrepRecipe, sources: dict[str, str], work: Path, rank: int, cache_path: str | None,
                 stat_update) -> None:
        from nightshift.prep.near_dup import MinHasher

        self.recipe = recipe
        self.rank = rank
        self.curator = DocumentCurator(recipe, sources)
        # A document's outcome depends on its profile only: a profile changed or added elsewhere keeps this cache.
        self.digests = {name: outcome_digest(recipe.profile(name)) for name in recipe.profiles}
        self.hasher = MinHasher(recipe.dedup.num_perm, recipe.dedup.ngram, recipe.dedup.seed)
        self.cache = OutcomeCache(Path(cache_path), outcome_digest(recipe)) if cache_path else None
        self.stat_update = stat_update
        self.files = shard_files(work, rank)
        self.tmp = {k: p.with_name(p.name + ".tmp") for k, p in self.files.items()}
        self.handles = {k: self.tmp[k].open("w", encoding="utf-8") for k in ("kept", "index", "outcomes", "new_cache")}
        self.batch: list[tuple[Any, str, str, dict, str, tuple | None]] = []
        self.batch_chars = 0
        self.signatures: list[np.ndarray] = []
        self.pending: list[tuple[str, bytes | None]] = []
        """(text, cached signature) of kept documents awaiting their signatures."""
        self.pending_bytes = 0
        self.done = self.hits = 0
        self.started = self.last_log = time.monotonic()

    def add(self, doc) -> None:
        """Queue one raw document (a datatrove Document read from the shard), deciding the batch when it is full."""
        meta = dict(doc.metadata)
        fmt = str(meta.pop("format", "text"))
        source = str(meta.pop("source", ""))
        raw_meta = meta.pop("meta", {}) or {}
        key = content_key(fmt, doc.text, self.digests[self.curator.profile_of(doc.id)])
        self.batch.append((doc, fmt, source, raw_meta, key, self.cache.get(key) if self.cache else None))
        self.batch_chars += len(doc.text)
        if len(self.batch) >= DECIDE_BATCH_DOCS or self.batch_chars >= DECIDE_BATCH_CHARS:
            self.decide()

    def decide(self) -> None:
        """Decide the queued documents (the cache's answers stand) and write each one's outcome."""
        todo = [(doc.id, fmt, doc.text) for doc, fmt, _, _, _, cached in self.batch if cached is None]
        fresh = iter(self.curator.process_batch(todo)) if todo else iter(())
        for doc, fmt, source, raw_meta, key, cached in self.batch:
            if cached is not None:
                outcome, signature = cached
                self.hits += 1
            else:
                outcome, signature = next(fresh), None
            self._write(doc, fmt, source, raw_meta, key, cached is not None, outcome, signature)
        self.done += len(self.batch)
        self.batch, self.batch_chars = [], 0

    def _write(self, doc, fmt: str, source: str, raw_meta: dict, key: str, was_cached: bool, outcome: Outcome,
               signature: bytes | None) -> None:
        record = {"id": doc.id, "key": key, "cached": was_cached, "profile": self.curator.profile_of(doc.id),
                  **asdict(outcome)}
        record.pop("text")
        self.handles["outcomes"].write(json.dumps(record, ensure_ascii=False) + "\n")
        if outcome.text is not None:
            text = outcome.text
            prep_meta = {k: v for k, v in (("language", outcome.language), ("pii", outcome.pii),
                                           ("contaminated", outcome.contaminated)) if v}
            kept = Document(doc.id, source, fmt, text, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                            {**raw_meta, **({"prep": prep_meta} if prep_meta else {})})
            self.handles["kept"].write(json.dumps(asdict(kept), ensure_ascii=False, sort_keys=True) + "\n")
            self.handles["index"].write(json.dumps({"id": doc.id, "sha256": kept.sha256, "key": key,
                                                    "chars": len(text)}) + "\n")
            self.pending.append((text, signature))
            self.pending_bytes += len(text)
            if self.pending_bytes >= SIGNATURE_BATCH_BYTES:
                self.flush_signatures()
        if not was_cached:
            self.handles["new_cache"].write(json.dumps({"key": key, "outcome": outcome.to_json()}) + "\n")
        self.stat_update("documents")
        self.stat_update("kept" if outcome.text is not None else "dropped")

    def flush_signatures(self) -> None:
        """Compute the MinHash signatures of the kept documents waiting for one (the cache's are reused)."""
        if not self.pending:
            return
        started = time.perf_counter()
        fresh = [i for i, (_, sig) in enumerate(self.pending) if sig is None]
        computed = self.hasher.signatures([self.pending[i][0] for i in fresh]) if fresh else None
        rows = np.empty((len(self.pending), self.recipe.dedup.num_perm), np.uint32)
        for j, (_, sig) in enumerate(self.pending):
            if sig is not None:
                rows[j] = np.frombuffer(sig, np.uint32)
        if fresh:
            rows[fresh] = computed
        self.curator.seconds["signatures"] += time.perf_counter() - started
        self.signatures.append(rows)
        self.pending, self.pending_bytes = [], 0

    def progress_due(self) -> bool:
        return time.monotonic() - self.last_log >= PROGRESS_EVERY_S

    def progress(self) -> str:
        """Return a line for the log: documents done, rate, cache hits; resets the progress clock."""
        now = self.last_log = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        return (f"task {self.rank}: {self.done} documents in {elapsed:.0f}s ({self.done / elapsed:.0f}/s), "
                f"{self.hits} from the cache")

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()

    def publish(self) -> int:
        """Write the signatures and rename every file into place; return the documents kept in this shard."""
        matrix = (np.concatenate(self.signatures) if self.signatures
                  else np.empty((0, self.recipe.dedup.num_perm), np.uint32))
        with self.tmp["signatures"].open("wb") as fh:
            np.save(fh, matrix)
        fault_point("prep.before_publish")
        for k in ("kept", "index", "signatures", "outcomes", "new_cache"):
            self.tmp[k].replace(self.files[k])  # the outcomes file last but one: present only when the task finished
        return len(matrix)
