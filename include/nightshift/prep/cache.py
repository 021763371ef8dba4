"""Outcomes of the per-document steps, kept by content hash and recipe, so unchanged documents are not redone.

One SQLite file under the cache folder; tasks read it (read-only, several processes at once), and only the
process that finishes a run writes to it, after the corpus is published. Losing the file costs time, never
correctness: the key holds ``digests.outcome_digest`` (the recipe's thresholds and evaluation sets, and the
steps' code: their source files and library versions), so a changed recipe or a fixed step misses.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np

from nightshift.prep.shards import Outcome, shard_files

_SCHEMA = """CREATE TABLE IF NOT EXISTS outcomes (
    key TEXT PRIMARY KEY, outcome TEXT NOT NULL, signature BLOB, used REAL NOT NULL)"""


class OutcomeCache:
    """Read and fill the outcome cache at ``path``."""

    def __init__(self, path: Path, recipe_digest: str) -> None:
        """``recipe_digest`` is ``digests.outcome_digest(recipe)``, which the keys of the outcomes hold."""
        self.path = Path(path)
        self.recipe_digest = recipe_digest
        self._reader: sqlite3.Connection | None = None
        self._missing = False

    def get(self, key: str) -> tuple[Outcome, bytes | None] | None:
        """Return the cached outcome and signature (uint32 bytes) of a document key, or None."""
        if self._missing:
            return None
        if self._reader is None:
            if not self.path.is_file():
                self._missing = True
                return None
            self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            row = self._reader.execute("SELECT outcome, signature FROM outcomes WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None  # a damaged cache is a miss, never a failed night
        if row is None:
            return None
        outcome = Outcome.from_json(row[0])
        if outcome.text is not None and row[1] is None:
            return None  # kept, but its signature was never stored: redo the document
        return outcome, bytes(row[1]) if row[1] is not None else None

    def _writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        return db

    def absorb(self, out: Path, tasks: int) -> int:
        """Store the new outcomes and signatures of a finished run and mark reused ones as used; return stored."""
        now = time.time()
        stored = 0
        db = self._writer()
        try:
            with db:
                for rank in range(tasks):
                    files = shard_files(out, rank)
                    with files["new_cache"].open(encoding="utf-8") as fh:
                        rows = [(e["key"], e["outcome"], now) for e in map(json.loads, fh)]
                    db.executemany(
                        "INSERT OR REPLACE INTO outcomes (key, outcome, signature, used) VALUES (?, ?, NULL, ?)", rows)
                    stored += len(rows)
                    with files["index"].open(encoding="utf-8") as fh:
                        keys = [json.loads(line)["key"] for line in fh]
                    matrix = np.load(files["signatures"])
                    db.executemany("UPDATE outcomes SET signature = ?, used = ? WHERE key = ?",
                                   [(matrix[i].tobytes(), now, k) for i, k in enumerate(keys)])
                    with files["outcomes"].open(encoding="utf-8") as fh:
                        reused = [(now, o["key"]) for o in map(json.loads, fh) if o["cached"]]
                    db.executemany("UPDATE outcomes SET used = ? WHERE key = ?", reused)
        finally:
            db.close()
        return stored

    def prune(self, older_than_s: float) -> int:
        """Delete outcomes no run has used for ``older_than_s`` seconds; return how many."""
        if not self.path.is_file():
            return 0
        db = self._writer()
        try:
            with db:
                return db.execute("DELETE FROM outcomes WHERE used < ?", (time.time() - older_than_s,)).rowcount
        finally:
            db.close()
