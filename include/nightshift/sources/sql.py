"""Rows of a database table (or query) as documents, read in batches and incrementally.

The caller hands in a SQLAlchemy engine (the Airflow adapter builds it from an Airflow connection through
the common-sql provider's hook), so this module knows nothing of Airflow. Reads stream through a
server-side cursor (``stream_results``) in batches, so a large table never sits in memory at once.

With an ``updated_column`` the read is incremental: only rows changed since the last run are fetched, into
a local snapshot (SQLite under ``$NIGHTSHIFT_HOME/sources/<name>/``), and one pass over the ids drops the
rows deleted since. The snapshot is written row by row, so a read killed half-way leaves one the next run
can continue from.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from nightshift.sources.document_store import RawDocument, Skip

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
MAX_TEXT_CHARS = 1_000_000


@dataclass(frozen=True)
class SqlSettings:
    """A table or query to read (a ``kind: sql`` entry of sources.yaml)."""

    conn_id: str
    """Airflow connection of the database."""
    table: str | None = None
    """Table (``schema.table``) to read; or give ``query``."""
    query: str | None = None
    """A SELECT returning the id, text (and updated-at) columns; only from sources.yaml, never from a Param."""
    id_column: str = "id"
    text_column: str = "text"
    updated_column: str | None = None
    """A column that grows when a row changes (timestamp or version): makes the read incremental."""
    format: str = "text"
    """How to read the text column: text, markdown or html."""
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ValueError("a sql source needs exactly one of `table` or `query`")
        names = {"table": self.table, "id_column": self.id_column, "text_column": self.text_column,
                 "updated_column": self.updated_column}
        bad = [k for k, v in names.items() if v is not None and not IDENTIFIER.fullmatch(v)]
        if bad:
            raise ValueError(f"sql source: {', '.join(bad)} must be plain identifiers (letters, digits, '_')")
        if self.query is not None and not re.match(r"(?is)^\s*(select|with)\b", self.query):
            raise ValueError("sql source: `query` must be a SELECT")
        if self.format not in ("text", "markdown", "html"):
            raise ValueError("sql source: format must be text, markdown or html")
        if not 1 <= self.batch_size <= 100_000:
            raise ValueError("sql source: batch_size must be between 1 and 100000")

    @property
    def relation(self) -> str:
        return self.table if self.table is not None else f"({self.query}) AS nightshift_source"

    @property
    def label(self) -> str:
        return self.table or "query"


@dataclass
class SqlReport:
    rows_read: int = 0
    """Rows fetched from the database this run (all of them, or only the changed ones)."""
    documents: int = 0
    deleted: int = 0
    batches: int = 0
    incremental: bool = False
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "skipped": dict(self.skipped)}


class SqlReader:
    """One read of one SQL source. Iterate ``read()`` for its documents; ``report`` and ``skips`` afterwards."""

    def __init__(self, settings: SqlSettings, engine, state_path: Path) -> None:
        self.settings = settings
        self.engine = engine
        self.state_path = state_path
        self.report = SqlReport(incremental=settings.updated_column is not None)
        self.skips: list[Skip] = []

    def _stream(self, sql: str, params: dict[str, Any]) -> Iterator[list]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=self.settings.batch_size).execute(
                text(sql), params)
            for batch in result.partitions(self.settings.batch_size):
                self.report.batches += 1
                yield batch

    def _document(self, row_id: Any, value: Any, updated: Any = None) -> RawDocument | None:
        key = str(row_id)
        if value is None:
            self._skip(key, "null text")
            return None
        if not isinstance(value, str):
            self._skip(key, f"text is not text: {type(value).__name__}")
            return None
        if len(value) > MAX_TEXT_CHARS:
            self._skip(key, f"text too long: {len(value)} characters")
            return None
        meta: dict[str, Any] = {"table": self.settings.label}
        if updated is not None:
            meta["updated_at"] = _to_text(updated)
        return RawDocument(id=key, source=f"{self.settings.label}#{key}", format=self.settings.format,
                           content=value, meta=meta)

    def _skip(self, key: str, reason: str) -> None:
        self.report.skipped[reason.split(":")[0]] += 1
        if len(self.skips) < 10_000:
            self.skips.append(Skip(f"{self.settings.label}#{key}", reason))

    def read(self) -> Iterator[RawDocument]:
        """Yield the documents of the source (the whole table: changed rows from the database, the rest from
        the snapshot when incremental)."""
        started = time.monotonic()
        try:
            if self.settings.updated_column is None:
                yield from self._read_all()
            else:
                yield from self._read_incremental()
        finally:
            self.report.seconds = round(time.monotonic() - started, 3)
            log.info("read %s: %s", self.settings.label, json.dumps(self.report.to_dict()))

    def _read_all(self) -> Iterator[RawDocument]:
        s = self.settings
        sql = f"SELECT {s.id_column} AS id, {s.text_column} AS text FROM {s.relation} ORDER BY {s.id_column}"
        for batch in self._stream(sql, {}):
            for row_id, value in batch:
                self.report.rows_read += 1
                doc = self._document(row_id, value)
                if doc is not None:
                    self.report.documents += 1
                    yield doc

    def _read_incremental(self) -> Iterator[RawDocument]:
        s = self.settings
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.state_path))
        try:
            db.execute("CREATE TABLE IF NOT EXISTS rows (id TEXT PRIMARY KEY, text TEXT, updated TEXT, reason TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS mark (key TEXT PRIMARY KEY, value TEXT)")
            row = db.execute("SELECT value FROM mark WHERE key = 'since'").fetchone()
            since = _from_json(row[0]) if row else None
            where = f" WHERE {s.updated_column} >= :since" if since is not None else ""
            sql = (f"SELECT {s.id_column} AS id, {s.text_column} AS text, {s.updated_column} AS updated "
                   f"FROM {s.relation}{where} ORDER BY {s.updated_column}, {s.id_column}")
            newest = since
            for batch in self._stream(sql, {"since": since} if since is not None else {}):
                for row_id, value, updated in batch:
                    self.report.rows_read += 1
                    db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                               (str(row_id), value if isinstance(value, str) else None, _to_text(updated),
                                None if isinstance(value, str) else (type(value).__name__ if value is not None
                                                                     else "null")))
                    if updated is not None and (newest is None or updated > newest):
                        newest = updated
                db.commit()
            # Deleted rows: one pass over the ids (in batches), then drop what the database no longer has.
            db.execute("CREATE TEMP TABLE present (id TEXT PRIMARY KEY)")
            for batch in self._stream(f"SELECT {s.id_column} AS id FROM {s.relation}", {}):
                db.executemany("INSERT OR IGNORE INTO present VALUES (?)", [(str(r[0]),) for r in batch])
            self.report.deleted = db.execute("DELETE FROM rows WHERE id NOT IN (SELECT id FROM present)").rowcount
            if newest is not None:
                db.execute("INSERT OR REPLACE INTO mark VALUES ('since', ?)", (_to_json(newest),))
            db.commit()
            for row_id, value, updated, reason in db.execute("SELECT id, text, updated, reason FROM rows ORDER BY id"):
                if value is None:
                    self._skip(row_id, "null text" if reason in (None, "null") else f"text is not text: {reason}")
                    continue
                doc = self._document(row_id, value, updated)
                if doc is not None:
                    self.report.documents += 1
                    yield doc
        finally:
            db.close()


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, date | datetime) else str(value)


def _to_json(value: Any) -> str:
    if isinstance(value, datetime):
        return json.dumps({"datetime": value.isoformat()})
    if isinstance(value, date):
        return json.dumps({"date": value.isoformat()})
    return json.dumps({"value": value})


def _from_json(raw: str) -> Any:
    data = json.loads(raw)
    if "datetime" in data:
        return datetime.fromisoformat(data["datetime"])
    if "date" in data:
        return date.fromisoformat(data["date"])
    return data["value"]
