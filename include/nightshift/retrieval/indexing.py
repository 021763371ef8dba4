"""Build the index of one dataset version: chunk every document, embed what the cache lacks, store it whole."""

from __future__ import annotations

import json
import logging
import time
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


def read_chunks(corpus: Path, tokenizer, config: RetrievalConfig) -> tuple[list[Chunk], dict[str, int]]:
    """Return the chunks of every document of a corpus file (JSONL with ``id`` and ``text``) and the counts of
    documents read, skipped (no id or no text) and cut at the per-document bound."""
    chunks: list[Chunk] = []
    counts = {"documents": 0, "skipped_documents": 0, "cut_documents": 0}
    seen: set[str] = set()
    with Path(corpus).open(encoding="utf-8") as lines:
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                counts["skipped_documents"] += 1
                continue
            doc_id, text = doc.get("id") if isinstance(doc, dict) else None, doc.get("text") if isinstance(doc, dict) \
                else None
            if not isinstance(doc_id, str) or not doc_id or not isinstance(text, str) or not text.strip() \
                    or doc_id in seen:
                counts["skipped_documents"] += 1
                continue
            seen.add(doc_id)
            found, cut = chunk_text(doc_id, text, tokenizer, config.chunk_tokens, config.chunk_overlap)
            counts["documents"] += 1
            counts["cut_documents"] += cut
            chunks.extend(found)
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
    manifest = IndexManifest(tag=tag, model_key=embedder.key, dimensions=embedder.dimensions, chunks=len(chunks),
                             documents=counts["documents"], engine=store.engine, kind="", counts=counts,
                             built_at=datetime.now(UTC).isoformat(timespec="seconds"))
    stored = store.write(manifest, chunks, vectors)
    log.info("index of %s stored (%s, %s): %d chunks, %d embedded now, %d from the cache, %.1fs", tag, stored.engine,
             stored.kind, stored.chunks, counts["embedded"], counts["cached"], time.monotonic() - started)
    return {**stored.to_dict(), "reused": stored.built_at != manifest.built_at, **counts}
