"""Rows of a database table (or query) as documents, read in batches and incrementally.

The caller hands in a SQLAlchemy engine (the Airflow adapter builds it from an Airflow connection through
the common-sql provider's hook), so this module knows nothing of Airflow. Reads stream through a
server-side cursor (``stream_results``) in batches, so a large table never sits in memory at once.

With an ``updated_column`` the read is incremental: only rows changed since the last run are fetched, into
a local snapshot (SQLite under ``$NIGHTSHIFT_HOME/sources/<name>/``), and one pass over the ids drops the
rows deleted since. The snapshot is written row by row, so a read killed half-way leaves one the next run
can continue from.

A high-water mark alone misses rows: a writer's transaction stamps rows when it starts (PostgreSQL's
``now()``) but they become visible when it commits, possibly after a read that already saw newer stamps; and
a row whose cursor is NULL is never ``>=`` anything. So each incremental read starts ``lookback`` before the
mark, also reads the rows whose cursor is NULL, and its pass over the ids fetches the ids the table has and
the snapshot lacks (rows committed later than the look-back window allowed for).

The saved mark never passes the database's clock at the start of the read (``CURRENT_TIMESTAMP`` for a
cursor with a time zone; for one without, the earlier of ``LOCALTIMESTAMP`` and UTC, the two conventions such a
column is written in; the earlier of ``CURRENT_DATE`` and UTC's date for a date; the reader's UTC clock where
the database cannot be asked): one row stamped by a writer whose clock is ahead, or by a session
in a time zone east of the reader's, would otherwise lift the mark past every later change. Such rows are read
again each night instead, and counted. A number (a version counter) has no clock and is not held back.

SQLite keeps timestamps as text, in whichever form each writer chose (``2026-12-01T08:00:00`` from an
application, ``2026-12-01 12:00:00`` from ``CURRENT_TIMESTAMP``), and text compares ``' ' < 'T'``. So on
SQLite a text cursor that reads as a timestamp is compared through ``strftime('%Y-%m-%d %H:%M:%f', ...)``,
one form in UTC, and the mark is kept in that form; a value that does not read as one is read every night.

Text that cannot be written as UTF-8 (SQLite stores whatever bytes it is given) is a counted skip of the row,
as it is for a file or a JSONL record.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

from nightshift.sources.document_store import RawDocument, Skip, encodable, printable

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
MAX_TEXT_CHARS = 1_000_000
MAX_IDS_PER_QUERY = 500
"""Ids fetched by one ``IN (...)`` query when the snapshot lacks rows the table has."""
SQLITE_TIME = "%Y-%m-%d %H:%M:%f"
"""The one form SQLite text timestamps are compared in (UTC, milliseconds)."""


@dataclass(frozen=True)
class Clock:
    """The database's clock at the start of a read, in each form a cursor may take."""

    aware: datetime
    naive: datetime
    """The earlier of the session's local time and UTC: a column without a time zone holds one or the other, and
    a mark held back too far costs re-reads only, one let too far misses changes."""
    today: date
    """The earlier of the session's date and UTC's."""
    text: str
    """``naive`` in the form of :data:`SQLITE_TIME`."""
    latest: datetime
    """The later of the session's local time and UTC: a naive cursor past it is surely in the future."""


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
    """The id column: a row's document id is its text (bytes as lowercase hex; an id of another type, an array
    or a JSON value, is a counted skip). In a column without a type (SQLite), the number 5 and the text '5' are
    one id: the later row read wins."""
    text_column: str = "text"
    updated_column: str | None = None
    """A column that grows when a row changes (timestamp or version): makes the read incremental. A change
    that does not make it grow past the previous read's mark less ``lookback`` (a stamp set back, a restore
    from a backup, a row deleted and inserted again with the same id and an old stamp) is not read until the
    row changes again; a new id is found anyway by the pass over the ids."""
    lookback: float = 3600.0
    """How far before the last read's high-water mark an incremental read starts again: seconds for a timestamp
    cursor (whole days, rounded up, for a date), cursor units for a number (a version counter). It must exceed
    the longest writer transaction: a row it stamps at its start and commits later is read only when the next
    read starts before that stamp (a new row is also found by the pass over the ids; a changed one is not).
    It must also exceed how far writers' clocks lag the database's (a session in a time zone west of the
    reader's writing a column without a time zone lags by the difference): their changes are missed beyond it.
    Writers ahead of the database's clock cost re-reads, never misses (the mark never passes that clock)."""
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
        if isinstance(self.lookback, bool) or not isinstance(self.lookback, int | float) or not (
                0 <= self.lookback < math.inf):
            raise ValueError("sql source: lookback must be a number >= 0 (seconds, or cursor units for a version)")

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
    missing: int = 0
    """Rows the table has and the snapshot lacked although older than the look-back window: fetched by id."""
    future: int = 0
    """Rows whose cursor is later than the database's clock at the start of the read: read again each night."""
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
        self.sqlite = engine.dialect.name == "sqlite"

    def _stream(self, sql: str, params: dict[str, Any], expanding: tuple[str, ...] = ()) -> Iterator[list]:
        from sqlalchemy import bindparam, text

        statement = text(sql).bindparams(*(bindparam(name, expanding=True) for name in expanding))
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            lenient = isinstance(raw, sqlite3.Connection)
            if lenient:
                # SQLite hands back whatever bytes were stored: strict decoding would fail the whole read (and
                # quote the text in its error). Undecodable bytes become lone surrogates, then a counted skip.
                strict, raw.text_factory = raw.text_factory, _lenient_text
            try:
                result = conn.execution_options(stream_results=True, yield_per=self.settings.batch_size).execute(
                    statement, params)
                for batch in result.partitions(self.settings.batch_size):
                    self.report.batches += 1
                    yield batch
            finally:
                if lenient:
                    raw.text_factory = strict

    def _document(self, key: str, value: Any, updated: Any = None) -> RawDocument | None:
        reason = _problem(value)
        if reason is not None:
            self._skip(key, reason)
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
                key, reason = _checked(row_id, value)
                if key is None:
                    self._skip("(id)", reason)
                    continue
                if reason is not None:
                    self._skip(key, reason)
                    continue
                doc = self._document(key, value)
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
            since = self._cursor(_from_json(row[0])) if row else None
            clock = self._clock()  # before the rows: one stamped after it is read again next time
            columns = f"{s.id_column} AS id, {s.text_column} AS text, {s.updated_column} AS updated"
            cursor = s.updated_column
            if self.sqlite and isinstance(since, str) and _sqlite_time(since) == since:
                cursor = f"strftime('{SQLITE_TIME}', {s.updated_column})"  # NULL for what is not a timestamp
            where = f" WHERE {cursor} >= :since OR {cursor} IS NULL" if since is not None else ""
            sql = f"SELECT {columns} FROM {s.relation}{where} ORDER BY {s.updated_column}, {s.id_column}"
            params = {"since": _before(since, s.lookback)} if since is not None else {}
            newest = since
            for batch in self._stream(sql, params):
                newest = self._keep(db, batch, newest, clock)
                db.commit()
            # One pass over the ids (in batches): what the snapshot lacks is fetched, what the table lacks dropped.
            db.execute("CREATE TEMP TABLE present (id TEXT PRIMARY KEY, raw)")
            for batch in self._stream(f"SELECT {s.id_column} AS id FROM {s.relation}", {}):
                present = []
                for (row_id,) in batch:
                    key = _key(row_id)
                    if key is None:  # counted here, every night; never kept in the snapshot
                        self._skip("(id)", _unsupported(row_id))
                    else:
                        present.append((printable(key), _bindable(row_id)))
                db.executemany("INSERT OR IGNORE INTO present VALUES (?, ?)", present)
            db.execute("CREATE TEMP TABLE lacking AS SELECT raw FROM present WHERE id NOT IN (SELECT id FROM rows)")
            lacking = db.execute("SELECT raw FROM lacking")
            while ids := [r[0] for r in lacking.fetchmany(MAX_IDS_PER_QUERY)]:
                fetch = f"SELECT {columns} FROM {s.relation} WHERE {s.id_column} IN :ids"
                for batch in self._stream(fetch, {"ids": ids}, expanding=("ids",)):
                    self.report.missing += len(batch)
                    newest = self._keep(db, batch, newest, clock)
            self.report.deleted = db.execute("DELETE FROM rows WHERE id NOT IN (SELECT id FROM present)").rowcount
            if self.report.future:
                log.warning("read %s: %d rows carry a cursor later than the database's clock; they are read again "
                            "each night until it catches up", s.label, self.report.future)
            if newest is not None:
                db.execute("INSERT OR REPLACE INTO mark VALUES ('since', ?)", (_to_json(_clamped(newest, clock)),))
            db.commit()
            for key, value, updated, reason in db.execute("SELECT id, text, updated, reason FROM rows ORDER BY id"):
                if value is None:
                    self._skip(key, _stored_reason(reason))
                    continue
                doc = self._document(key, value, updated)
                if doc is not None:
                    self.report.documents += 1
                    yield doc
        finally:
            db.close()

    def _keep(self, db: sqlite3.Connection, batch: list, newest: Any, clock: Clock) -> Any:
        """Write a batch of rows into the snapshot; return the high-water mark including them."""
        for row_id, value, updated in batch:
            self.report.rows_read += 1
            key, reason = _checked(row_id, value)
            if key is not None:  # an id of no stable text is counted by the pass over the ids
                db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                           (key, None if reason else value, _to_text(updated), reason))
            cursor = self._cursor(updated)
            if cursor is None:
                continue
            if _later(cursor, _clamped(cursor, clock, latest=True)):
                self.report.future += 1
            if newest is None or _later(cursor, newest):
                newest = cursor
        return newest

    def _cursor(self, value: Any) -> Any:
        """Return a cursor value in the form it is compared in (SQLite timestamp text in one form)."""
        if self.sqlite and isinstance(value, str):
            return _sqlite_time(value) or value
        return value

    def _clock(self) -> Clock:
        """Return the database's clock now (the reader's UTC clock where the database cannot be asked)."""
        from sqlalchemy import text

        now = datetime.now(UTC)
        try:
            with self.engine.connect() as conn:
                if self.sqlite:
                    utc = datetime.fromisoformat(conn.exec_driver_sql(
                        f"SELECT strftime('{SQLITE_TIME}', 'now')").scalar_one())
                    return Clock(utc.replace(tzinfo=UTC), utc, utc.date(), _sqlite_time(utc.isoformat()), utc)
                aware, local, today = conn.execute(text("SELECT CURRENT_TIMESTAMP, LOCALTIMESTAMP, CURRENT_DATE")).one()
        except Exception as exc:  # a database without these names: the reader's clock is the next best
            log.warning("read %s: the database's clock could not be read (%s); using this machine's UTC clock",
                        self.settings.label, type(exc).__name__)
            aware, local, today = now, now.replace(tzinfo=None), now.date()
        if not (isinstance(aware, datetime) and aware.tzinfo is not None):
            aware = now
        utc = aware.astimezone(UTC).replace(tzinfo=None)
        if not (isinstance(local, datetime) and local.tzinfo is None):
            local = utc
        if not isinstance(today, date) or isinstance(today, datetime):
            today = local.date()
        naive = min(local, utc)
        return Clock(aware, naive, min(today, utc.date()), _sqlite_time(naive.isoformat()), max(local, utc))


def _checked(row_id: Any, value: Any) -> tuple[str | None, str | None]:
    """Return a row's key in the snapshot and the skips (None for an id of no stable text), and why the row is
    not a document (None when it is)."""
    key = _key(row_id)
    if key is None:
        return None, _unsupported(row_id)
    if not encodable(key):
        return printable(key), "not UTF-8 text: the id"
    return key, _problem(value)


def _key(row_id: Any) -> str | None:
    """Return the text of an id, the same on every read (bytes as lowercase hex); None for a type without one."""
    if isinstance(row_id, str):
        return row_id
    if isinstance(row_id, bytes | bytearray | memoryview):  # str() of a memoryview names its address
        return bytes(row_id).hex()
    if isinstance(row_id, int | float | Decimal | UUID | date | clock_time | timedelta):
        return str(row_id)
    return None


def _unsupported(row_id: Any) -> str:
    return f"id of an unsupported type: {type(row_id).__name__[:40]}"


def _problem(value: Any) -> str | None:
    """Return why a text column's value is not a document, or None when it is one."""
    if value is None:
        return "null text"
    if not isinstance(value, str):
        return f"text is not text: {type(value).__name__}"
    if len(value) > MAX_TEXT_CHARS:
        return f"text too long: {len(value)} characters"
    if not encodable(value):
        return "not UTF-8 text: undecodable bytes"
    return None


def _stored_reason(reason: str | None) -> str:
    # snapshots written before reasons were stored whole hold "null" or the value's type name
    if reason in (None, "null"):
        return "null text"
    return reason if ":" in reason or reason == "null text" else f"text is not text: {reason}"


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _bindable(value: Any) -> Any:
    """Return an id as SQLite can keep it and the database can compare it again (a UUID, a number as text)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _sqlite_time(value: str) -> str | None:
    """Return timestamp text in the form of :data:`SQLITE_TIME` (UTC, milliseconds cut, never rounded up, so the
    mark is never later than SQLite's form of the same value); None when it is not a timestamp."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return f"{parsed:%Y-%m-%d %H:%M:%S}.{parsed.microsecond // 1000:03d}"


def _clamped(mark: Any, clock: Clock, latest: bool = False) -> Any:
    """Return ``mark``, or the clock's time when the mark is later (a number is never held back); ``latest``
    takes the later reading of the clock for a cursor without a time zone."""
    if isinstance(mark, datetime):
        limit: Any = clock.aware if mark.tzinfo is not None else clock.latest if latest else clock.naive
    elif isinstance(mark, date):
        limit = clock.today
    elif isinstance(mark, str) and _sqlite_time(mark) == mark:
        limit = clock.text
    else:
        return mark
    return limit if _later(mark, limit) else mark


def _later(a: Any, b: Any) -> bool:
    """Return whether ``a`` is later than ``b``; False when they cannot be compared (a column of mixed types)."""
    try:
        return bool(a > b)
    except TypeError:
        return False


def _before(mark: Any, lookback: float) -> Any:
    """Return the cursor value ``lookback`` before ``mark``; ``mark`` itself when the cursor has no arithmetic."""
    if isinstance(mark, datetime):
        return mark - timedelta(seconds=lookback)
    if isinstance(mark, date):
        return mark - timedelta(days=math.ceil(lookback / 86_400))
    if isinstance(mark, bool):
        return mark
    if isinstance(mark, int):
        return mark - math.ceil(lookback)
    if isinstance(mark, float | Decimal):
        return mark - type(mark)(lookback)
    if isinstance(mark, str):  # SQLite keeps timestamps as ISO text; compare in the same form
        try:
            parsed = datetime.fromisoformat(mark)
        except ValueError:
            log.warning("incremental read: the cursor is text that is not a timestamp; no look-back applied")
            return mark
        earlier = parsed - timedelta(seconds=lookback)
        if _sqlite_time(mark) == mark:
            return _sqlite_time(earlier.isoformat())
        return earlier.isoformat("T" if "T" in mark else " ")
    return mark


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, date | datetime) else printable(str(value))


def _to_json(value: Any) -> str:
    if isinstance(value, datetime):
        return json.dumps({"datetime": value.isoformat()})
    if isinstance(value, date):
        return json.dumps({"date": value.isoformat()})
    if isinstance(value, Decimal):
        return json.dumps({"decimal": str(value)})
    return json.dumps({"value": value})


def _from_json(raw: str) -> Any:
    data = json.loads(raw)
    if "datetime" in data:
        return datetime.fromisoformat(data["datetime"])
    if "date" in data:
        return date.fromisoformat(data["date"])
    if "decimal" in data:
        return Decimal(data["decimal"])
    return data["value"]
