"""The embedding cache: one vector per (embedding model key, chunk text hash), in SQLite.

Two runs may write it at once (WAL, ``INSERT OR REPLACE``: the same key always holds the same vector); a vector of
the wrong size or not of unit length (a torn or foreign row) is not believed and is embedded again.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np

CHUNK = 500
"""Keys per query: under SQLite's bound on host parameters."""


class EmbeddingCache:
    def __init__(self, path: Path, model_key: str, dimensions: int) -> None:
        self.path = Path(path)
        self.model_key = model_key
        self.dimensions = dimensions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, hash TEXT NOT NULL, "
                       "vector BLOB NOT NULL, PRIMARY KEY (model, hash)) WITHOUT ROWID")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """Return the cached vectors of ``hashes`` (those not cached are absent)."""
        found: dict[str, np.ndarray] = {}
        size = self.dimensions * 4
        with closing(self._connect()) as db:
            for start in range(0, len(hashes), CHUNK):
                part = hashes[start:start + CHUNK]
                rows = db.execute(f"SELECT hash, vector FROM vectors WHERE model = ? AND hash IN "
                                  f"({','.join('?' * len(part))})", [self.model_key, *part])
                for key, blob in rows:
                    if isinstance(blob, bytes) and len(blob) == size:
                        vector = np.frombuffer(blob, np.float32)
                        # The model's vectors are unit vectors: a row of another length was not written by it.
                        if np.isfinite(vector).all() and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3:
                            found[key] = vector
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        rows = [(self.model_key, key, np.asarray(v, np.float32).tobytes()) for key, v in vectors.items()]
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO vectors (model, hash, vector) VALUES (?, ?, ?)", rows)
