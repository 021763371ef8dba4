"""Where the corpus indexes live: FAISS files under the home (the default) or pgvector on PostgreSQL.

An index belongs to one dataset version (its DVC tag) and one embedding model (``Embedder.key``): a model's
lineage, which names its dataset version, names its index too. An index is written whole or not at all (a folder
renamed into place; one transaction), and never changed after: two runs indexing the same version write the same
index once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.retrieval.chunking import Chunk

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MANIFEST = "manifest.json"
OPEN_INDEXES = 3
"""File indexes a process keeps loaded (a version's index is read from disk once, then kept while in use)."""


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    text: str
    score: float
    """Cosine similarity to the question (-1..1)."""


@dataclass(frozen=True)
class IndexManifest:
    tag: str
    model_key: str
    dimensions: int
    chunks: int
    documents: int
    engine: str
    kind: str
    """``flat`` (exact) or ``hnsw``."""
    built_at: str
    counts: dict[str, Any] = field(default_factory=dict)
    """How the build went: chunks embedded, taken from the cache, documents skipped or cut, seconds."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checked_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} must be 1 to 128 letters, digits, '.', '_' or '-'")
    return value


def open_store(url: str | None, home: Path, config) -> IndexStore:
    """Return the store ``url`` names (NIGHTSHIFT_VECTOR_STORE): None or ``files``, FAISS files under
    ``home/indexes``; ``postgresql://...``, pgvector."""
    if not url or url == "files":
        return FileStore(Path(home) / "indexes", config)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return PgVectorStore(url, config)
    raise ValueError("NIGHTSHIFT_VECTOR_STORE must be unset, `files`, or a postgresql:// URL")


class IndexStore:
    engine = ""

    def manifest(self, tag: str, model_key: str) -> IndexManifest | None:
        raise NotImplementedError

    def write(self, manifest: IndexManifest, chunks: list[Chunk], vectors: np.ndarray) -> IndexManifest:
        """Store a whole index; when another run stored this version's already, return its manifest."""
        raise NotImplementedError

    def search(self, tag: str, model_key: str, query: np.ndarray, k: int) -> list[Hit]:
        raise NotImplementedError

    def chunk_hashes(self, tag: str, model_key: str) -> dict[str, str]:
        """Return chunk id -> text hash of a stored index (what a rebuild compares with)."""
        raise NotImplementedError


# -- FAISS files ---------------------------------------------------------------------------------------------


class FileStore(IndexStore):
    """``<root>/<tag>/<model key>/``: ``faiss.index`` (inner product over unit vectors: cosine), ``chunks.jsonl``
    with ``offsets.npy`` (a hit's record is read by its byte offset, so opening a million-chunk index reads no
    text), and ``manifest.json``, written last inside a temporary folder that is then renamed into place."""

    engine = "files"

    def __init__(self, root: Path, config) -> None:
        self.root = Path(root)
        self.config = config
        self._open: dict[Path, tuple[Any, np.ndarray, float]] = {}
        self._lock = threading.Lock()

    def folder(self, tag: str, model_key: str) -> Path:
        return self.root / checked_name(tag, "dataset tag") / checked_name(model_key, "model key")

    def manifest(self, tag: str, model_key: str) -> IndexManifest | None:
        path = self.folder(tag, model_key) / MANIFEST
        try:
            return IndexManifest(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def write(self, manifest: IndexManifest, chunks: list[Chunk], vectors: np.ndarray) -> IndexManifest:
        import fcntl

        target = self.folder(manifest.tag, manifest.model_key)
        if (existing := self.manifest(manifest.tag, manifest.model_key)) is not None:
            return existing
        target.parent.mkdir(parents=True, exist_ok=True)
        # One writer per version and model at a time (a lock the kernel drops with a killed process): the runs that
        # wait find the index written, and whoever holds the lock may remove what killed writers left.
        with open(target.parent / f".{manifest.model_key}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (existing := self.manifest(manifest.tag, manifest.model_key)) is not None:
                return existing
            for leftover in target.parent.glob(f".{manifest.model_key}.tmp*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
            return self._write(manifest, chunks, vectors, target)

    def _write(self, manifest: IndexManifest, chunks: list[Chunk], vectors: np.ndarray,
               target: Path) -> IndexManifest:
        import faiss

        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.model_key}.tmp", dir=target.parent))
        try:
            index = self._new_index(manifest.dimensions, len(chunks))
            if len(chunks):
                index.add(np.ascontiguousarray(vectors, np.float32))
            faiss.write_index(index, str(tmp / "faiss.index"))
            offsets = np.zeros(len(chunks), np.int64)
            with (tmp / "chunks.jsonl").open("wb") as out:
                for i, c in enumerate(chunks):
                    offsets[i] = out.tell()
                    out.write(json.dumps({"id": c.id, "doc": c.doc_id, "hash": c.hash, "text": c.text},
                                         ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
            np.save(tmp / "offsets.npy", offsets)
            kind = "flat" if len(chunks) < self.config.exact_below else "hnsw"
            manifest = IndexManifest(**{**manifest.to_dict(), "kind": kind, "engine": self.engine})
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
            os.rename(tmp, target)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _new_index(self, dimensions: int, count: int):
        import faiss

        if count < self.config.exact_below:
            return faiss.IndexFlatIP(dimensions)
        index = faiss.IndexHNSWFlat(dimensions, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.config.hnsw_ef_construction
        return index

    def _index(self, folder: Path):
        import faiss

        stamp = (folder / MANIFEST).stat().st_mtime
        with self._lock:
            cached = self._open.get(folder)
            if cached is None or cached[2] != stamp:
                index = faiss.read_index(str(folder / "faiss.index"))
                if hasattr(index, "hnsw"):
                    index.hnsw.efSearch = self.config.hnsw_ef_search
                cached = (index, np.load(folder / "offsets.npy"), stamp)
                self._open.pop(folder, None)
                while len(self._open) >= OPEN_INDEXES:  # the champion's and a candidate's, not every version's
                    self._open.pop(next(iter(self._open)))
                self._open[folder] = cached
        return cached[0], cached[1]

    def search(self, tag: str, model_key: str, query: np.ndarray, k: int) -> list[Hit]:
        folder = self.folder(tag, model_key)
        if not (folder / MANIFEST).is_file():
            raise LookupError(f"no index of {tag} for this embedding model")
        index, offsets = self._index(folder)
        if index.ntotal == 0:
            return []
        scores, ids = index.search(np.ascontiguousarray(query.reshape(1, -1), np.float32), min(k, index.ntotal))
        hits = []
        with (folder / "chunks.jsonl").open("rb") as records:
            for score, i in zip(scores[0], ids[0], strict=True):
                if i < 0:
                    continue
                records.seek(int(offsets[i]))
                record = json.loads(records.readline())
                hits.append(Hit(record["id"], record["doc"], record["text"], float(score)))
        return hits

    def chunk_hashes(self, tag: str, model_key: str) -> dict[str, str]:
        found = {}
        with (self.folder(tag, model_key) / "chunks.jsonl").open(encoding="utf-8") as records:
            for line in records:
                record = json.loads(line)
                found[record["id"]] = record["hash"]
        return found


# -- pgvector ------------------------------------------------------------------------------------------------


class PgVectorStore(IndexStore):
    """Tables ``nightshift_rag_indexes`` (one manifest per version and model) and ``nightshift_rag_chunks_<dims>``
    (one row per chunk, ``vector(<dims>)`` with an HNSW index over inner product). A version is written in one
    transaction under an advisory lock, its manifest last: readers see all of it or none. Searches use pgvector's
    iterative index scan, so filtering by version still returns k rows."""

    engine = "pgvector"

    def __init__(self, url: str, config) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.config = config
        self._conn = None
        self._lock = threading.Lock()
        self._ready: set[int] = set()
        self._manifests: dict[tuple[str, str], IndexManifest] = {}
        """Written versions' manifests, read once: a version is never changed after it is written."""

    def _connection(self):
        import psycopg
        from pgvector.psycopg import register_vector

        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.url, autocommit=False, connect_timeout=10)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('nightshift_rag_schema'))")
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)
            self._conn = conn
        return self._conn

    def _table(self, dimensions: int) -> str:
        return f"nightshift_rag_chunks_{int(dimensions)}"

    def _ensure(self, conn, dimensions: int) -> None:
        if dimensions in self._ready:
            return
        table, cfg = self._table(dimensions), self.config
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('nightshift_rag_schema'))")
            conn.execute("CREATE TABLE IF NOT EXISTS nightshift_rag_indexes (tag text NOT NULL, model text NOT NULL, "
                         "manifest jsonb NOT NULL, PRIMARY KEY (tag, model))")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (tag text NOT NULL, model text NOT NULL, "
                         f"chunk_id text NOT NULL, doc_id text NOT NULL, hash text NOT NULL, text text NOT NULL, "
                         f"embedding vector({int(dimensions)}) NOT NULL, PRIMARY KEY (tag, model, chunk_id))")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw (embedding vector_ip_ops) "
                         f"WITH (m = {int(cfg.hnsw_m)}, ef_construction = {int(cfg.hnsw_ef_construction)})")
        self._ready.add(dimensions)

    def manifest(self, tag: str, model_key: str) -> IndexManifest | None:
        if (tag, model_key) in self._manifests:
            return self._manifests[(tag, model_key)]
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    row = conn.execute("SELECT to_regclass('nightshift_rag_indexes') IS NOT NULL").fetchone()
                    if not row[0]:
                        return None
                    row = conn.execute("SELECT manifest FROM nightshift_rag_indexes WHERE tag = %s AND model = %s",
                                       (tag, model_key)).fetchone()
            except Exception:
                self._drop()
                raise
        if not row:
            return None
        self._manifests[(tag, model_key)] = found = IndexManifest(**row[0])
        return found

    def write(self, manifest: IndexManifest, chunks: list[Chunk], vectors: np.ndarray) -> IndexManifest:
        from psycopg.types.json import Jsonb

        manifest = IndexManifest(**{**manifest.to_dict(), "kind": "hnsw", "engine": self.engine})
        table = self._table(manifest.dimensions)
        with self._lock:
            conn = self._connection()
            try:
                self._ensure(conn, manifest.dimensions)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"{manifest.tag}/{manifest.model_key}",))
                    row = conn.execute("SELECT manifest FROM nightshift_rag_indexes WHERE tag = %s AND model = %s",
                                       (manifest.tag, manifest.model_key)).fetchone()
                    if row:
                        return IndexManifest(**row[0])
                    with conn.cursor().copy(f"COPY {table} (tag, model, chunk_id, doc_id, hash, text, embedding) "
                                            "FROM STDIN WITH (FORMAT BINARY)") as copy:
                        copy.set_types(["text", "text", "text", "text", "text", "text", "vector"])
                        for chunk, vector in zip(chunks, vectors, strict=True):
                            copy.write_row((manifest.tag, manifest.model_key, chunk.id, chunk.doc_id, chunk.hash,
                                            chunk.text, np.asarray(vector, np.float32)))
                    conn.execute("INSERT INTO nightshift_rag_indexes (tag, model, manifest) VALUES (%s, %s, %s)",
                                 (manifest.tag, manifest.model_key, Jsonb(manifest.to_dict())))
                    # Fresh statistics: without them the planner takes a version's rows for a handful, filters
                    # them through the primary key and sorts them all (exact, 40 times slower at 100,000 chunks)
                    # instead of walking the HNSW graph, until autovacuum analyzes the table.
                    conn.execute(f"ANALYZE {table}")
            except Exception:
                self._drop()
                raise
        return manifest

    def search(self, tag: str, model_key: str, query: np.ndarray, k: int) -> list[Hit]:
        found = self.manifest(tag, model_key)
        if found is None:
            raise LookupError(f"no index of {tag} for this embedding model")
        table = self._table(found.dimensions)
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL hnsw.ef_search = {int(self.config.hnsw_ef_search)}")
                    conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                    rows = conn.execute(
                        f"SELECT chunk_id, doc_id, text, -(embedding <#> %s) AS score FROM {table} "
                        "WHERE tag = %s AND model = %s ORDER BY embedding <#> %s LIMIT %s",
                        (np.asarray(query, np.float32), tag, model_key, np.asarray(query, np.float32), int(k)),
                    ).fetchall()
            except Exception:
                self._drop()
                raise
        hits = [Hit(r[0], r[1], r[2], float(r[3])) for r in rows]
        return sorted(hits, key=lambda h: -h.score)  # relaxed order: nearly sorted, sorted here

    def chunk_hashes(self, tag: str, model_key: str) -> dict[str, str]:
        found = self.manifest(tag, model_key)
        if found is None:
            return {}
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                rows = conn.execute(f"SELECT chunk_id, hash FROM {self._table(found.dimensions)} WHERE tag = %s "
                                    "AND model = %s", (tag, model_key)).fetchall()
        return dict(rows)

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
