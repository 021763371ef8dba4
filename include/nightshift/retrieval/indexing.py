"""Build the index of one dataset version: chunk every document, embed what the cache lacks, store it whole."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.faults import fault_point
from nightshift.retrieval.cache import EmbeddingCache
from nightshift.retrieval.chunking import Chunk, chunk_text
from nightshift.retrieval.config import RetrievalConfig
from nightshift.retrieval.store import IndexManifest, IndexStore

log = logging.getLogger(__name__)

EMBED_BATCH = 512
"""Chunks embedded (and then cached) at a time: a task killed mid-way keeps what it embedded."""
PROGRESS_SECONDS = 15.0


MAX_ID_CHARS = 1024


def _skip_reason(doc: Any, seen: set[str]) -> str | None:
    """Why a corpus record is not indexed, or None: it needs a string id (short, new) and text, both plain
    Unicode (no lone surrogate, no NUL: neither can be stored, tokenized or sent back in a citation)."""
    if not isinstance(doc, dict):
        return "not_an_object"
    doc_id, text = doc.get("id"), doc.get("text")
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > MAX_ID_CHARS:
        return "bad_id"
    if not isinstance(text, str) or not text.strip():
        return "no_text"
    if doc_id in seen:
        return "duplicate_id"
    for value in (doc_id, text):
        if "\x00" in value:
            return "nul_character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "lone_surrogate"
    return None


def read_chunks(corpus: Path, tokenizer, config: RetrievalConfig) -> tuple[list[Chunk], dict[str, Any]]:
    """Return the chunks of every document of a corpus file (JSONL with ``id`` and ``text``) and the counts of
    documents read, skipped (by reason: a line that is not JSON or not UTF-8, no id or text, a duplicate id, text
    that is not plain Unicode) and cut at the per-document bound. A bad line is a counted skip, never the end of
    the build."""
    chunks: list[Chunk] = []
    counts: dict[str, Any] = {"documents": 0, "skipped_documents": 0, "cut_documents": 0, "skip_reasons": {}}
    seen: set[str] = set()
    with Path(corpus).open("rb") as lines:
        for raw in lines:
            try:
                doc = json.loads(raw.decode("utf-8"))
                reason = _skip_reason(doc, seen)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                reason = "not_json"
            if reason is not None:
                counts["skipped_documents"] += 1
                counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
                continue
            seen.add(doc["id"])
            found, cut = chunk_text(doc["id"], doc["text"], tokenizer, config.chunk_tokens, config.chunk_overlap)
            counts["documents"] += 1
            counts["cut_documents"] += cut
            chunks.extend(found)
    if counts["skipped_documents"]:
        log.warning("%d corpus records not indexed: %s", counts["skipped_documents"],
                    ", ".join(f"{k} {v}" for k, v in sorted(counts["skip_reasons"].items())))
    return chunks, counts


def build_index(corpus: Path, tag: str, store: IndexStore, embedder, cache: EmbeddingCache,
                config: RetrievalConfig) -> dict[str, Any]:
    """Index ``corpus`` as dataset version ``tag``; return the counts (``embedded``: chunks the model read now,
    ``cached``: chunks whose vectors an earlier night made). An index already stored is returned as it is."""
    started = time.monotonic()
    if (existing := store.manifest(tag, embedder.key)) is not None:
        log.info("index of %s (%s) exists: %d chunks", tag, store.engine, existing.chunks)
        return {**existing.to_dict(), "reused": True, "embedded": 0, "cached": 0}
    chunks, counts = read_chunks(corpus, embedder.tokenizer, config)
    log.info("%s: %d documents in %d chunks of up to %d tokens (%d overlapping)", tag, counts["documents"],
             len(chunks), config.chunk_tokens, config.chunk_overlap)
    hashes = [c.hash for c in chunks]
    vectors = np.zeros((len(chunks), embedder.dimensions), np.float32)
    known = cache.get(list(dict.fromkeys(hashes)))
    missing = list(dict.fromkeys(h for h in hashes if h not in known))
    texts = {c.hash: c.text for c in chunks}
    last = time.monotonic()
    for start in range(0, len(missing), EMBED_BATCH):
        part = missing[start:start + EMBED_BATCH]
        made = embedder.embed([texts[h] for h in part])
        fresh = dict(zip(part, made, strict=True))
        cache.put(fresh)
        fault_point("retrieval.after_embed")
        known.update(fresh)
        if time.monotonic() - last > PROGRESS_SECONDS or start + EMBED_BATCH >= len(missing):
            last = time.monotonic()
            done = min(start + EMBED_BATCH, len(missing))
            log.info("embedded %d/%d new chunks (%.0f chunks/s)", done, len(missing),
                     done / max(time.monotonic() - started, 1e-9))
    for i, h in enumerate(hashes):
        vectors[i] = known[h]
    counts.update({"chunks": len(chunks), "embedded": len(missing), "cached": len(set(hashes)) - len(missing),
                   "seconds": round(time.monotonic() - started, 2)})
    counts["build"] = uuid.uuid4().hex  # which run's index was stored, when runs race
    manifest = IndexManifest(tag=tag, model_key=embedder.key, dimensions=embedder.dimensions, chunks=len(chunks),
                             documents=counts["documents"], engine=store.engine, kind="", counts=counts,
                             built_at=datetime.now(UTC).isoformat(timespec="seconds"))
    stored = store.write(manifest, chunks, vectors)
    log.info("index of %s stored (%s, %s): %d chunks, %d embedded now, %d from the cache, %.1fs", tag, stored.engine,
             stored.kind, stored.chunks, counts["embedded"], counts["cached"], time.monotonic() - started)
    mine = stored.counts.get("build") == counts["build"]
    return {**stored.to_dict(), **counts, "reused": not mine}
