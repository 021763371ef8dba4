"""The request/response log and user feedback, in a real database (SQLite by default, PostgreSQL in production).

Every answer is stored with the model version that produced it (and that version's training run and dataset
tag), so any answer traces back to model -> run -> dataset -> bytes (``nightshift trace <response id>``).
Prompts, answers, corrections and comments are scrubbed with the preparation step's scrubber
(``prep.pii.Scrubber``: e-mail addresses, phone numbers, IP addresses, payment cards, IBANs, credentials)
before they are written, and cut at ``max_chars``. Rows older than the retention are deleted.

Answers are written by a background thread from a queue bounded by count and by the text it holds
(``queue_bytes``), so the database never slows an answer; a full queue drops the entry and counts it
(``dropped``). Feedback is written before ``POST /v1/feedback``
answers, after the pending answers are flushed, so feedback on an answer just received finds it. A key sees
and rates only its own answers.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from nightshift.prep.pii import Scrubber

log = logging.getLogger(__name__)

metadata = sa.MetaData()

responses = sa.Table(
    "nightshift_responses", metadata,
    sa.Column("response_id", sa.String(80), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("key_id", sa.String(64)),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("model_role", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("dataset_tag", sa.String(200)),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("finish", sa.String(64)),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("seconds", sa.Float),
    sa.Column("scrubbed", sa.Text, nullable=False),
    sa.Column("truncated", sa.Boolean, nullable=False),
    sa.Column("prompt_name", sa.String(64)),
    sa.Column("prompt_version", sa.Integer),
    sa.Column("prompt_role", sa.String(16)),
    sa.Column("citations", sa.Text),
)
ADDED_COLUMNS = ("prompt_name", "prompt_version", "prompt_role", "citations")
"""Columns added after the table was first created: a log written by an earlier release gets them (nullable)."""

feedback = sa.Table(
    "nightshift_feedback", metadata,
    sa.Column("feedback_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(80), sa.ForeignKey("nightshift_responses.response_id"), nullable=False,
              index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("key_id", sa.String(64)),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("correction", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Column("model_version", sa.Integer, nullable=False),
)


@dataclass
class LoggedAnswer:
    """One answer as it is logged (content not yet scrubbed)."""

    response_id: str
    key_id: str | None
    route: str
    model_name: str
    model_version: int
    model_role: str
    run_id: str | None
    dataset_tag: str | None
    request: Any
    """The messages or prompts (JSON-serialisable)."""
    answer: list[str]
    finish: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    prompt_name: str | None = None
    """The prompt template the answer was given under (serving/prompting.py), its version and role; None for
    none (a completion, or no production prompt yet)."""
    prompt_version: int | None = None
    prompt_role: str | None = None
    citations: list[dict[str, Any]] | None = None
    """A retrieval-augmented answer's citations (serving/retrieval.py): the chunks it was given; None: no retrieval."""


class UnknownResponse(LookupError):
    """No logged answer with this id for this key."""


class RequestLog:
    """Writes answers and feedback to ``url`` (any SQLAlchemy URL); ``start`` before use, ``stop`` to flush."""

    def __init__(self, url: str, retention_days: float = 30.0, max_chars: int = 32_000, queue_size: int = 10_000,
                 purge_every_s: float = 3600.0, queue_bytes: int = 64 * 1024 * 1024) -> None:
        self.url = url
        self.retention = timedelta(days=retention_days)
        self.max_chars = max_chars
        self.purge_every_s = purge_every_s
        self.scrubber = Scrubber()
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._queue: queue.Queue[LoggedAnswer | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._ready = False
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._feedback_lock = threading.Lock()
        self.queue_bytes = queue_bytes
        """The most text the queue holds (answers waiting to be written), whatever their count."""
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_hand = 0
        """Answers the writer has taken and not yet written or counted."""
        self._given_up = False
        self._stopping = threading.Event()
        """Set once ``stop`` has waited its time: the writer then stops retrying an unavailable database."""

    # -- lifecycle

    def open(self) -> None:
        """Create the tables if they do not exist, and the columns a log of an earlier release lacks."""
        for attempt in range(3):
            try:
                metadata.create_all(self.engine)
                break
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                # Replicas starting at once on PostgreSQL: another one created a table between the check and the
                # CREATE. The next attempt finds it there.
                if attempt == 2:
                    raise
        present = {c["name"] for c in sa.inspect(self.engine).get_columns(responses.name)}
        missing = [responses.c[name] for name in ADDED_COLUMNS if name not in present]
        for column in missing:
            kind = column.type.compile(dialect=self.engine.dialect)
            # PostgreSQL says IF NOT EXISTS; SQLite cannot, and a replica that lost the race there reads the
            # columns again on a connection of its own (the failed transaction is gone).
            guard = "IF NOT EXISTS " if self.engine.dialect.name == "postgresql" else ""
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE {responses.name} ADD COLUMN {guard}{column.name} {kind}"))
            except sa.exc.DBAPIError:
                if column.name not in {c["name"] for c in sa.inspect(self.engine).get_columns(responses.name)}:
                    raise
        if missing:
            log.info("request log: added the columns %s", ", ".join(c.name for c in missing))
        self._ready = True

    def start(self) -> None:
        try:
            self.open()
            self.purge()
        except sa.exc.OperationalError as exc:  # answers are served anyway; the writer retries
            log.error("request log database unavailable (%s); answers are queued until it is", type(exc).__name__)
        self._thread = threading.Thread(target=self._writer, name="request-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        end = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.error("request log: %d answers not written at shutdown", self._queue.qsize())
        self._thread.join(max(0.0, end - time.monotonic()))
        if self._thread.is_alive():  # still retrying an unavailable database: give up, counting what is lost
            self._stopping.set()
            self._thread.join(5)
            with self._count_lock:
                if self._thread.is_alive():  # blocked in the database: what it holds is counted here, once
                    with self._queue.mutex:
                        waiting = sum(1 for entry in self._queue.queue if entry is not None)
                    lost = self._in_hand + waiting
                    self._in_hand = 0
                    self._given_up = True
                    self.failed += lost
                    log.error("request log: %d answers not written at shutdown (the database did not answer)", lost)
        self._thread = None
        self.engine.dispose()

    # -- answers

    def record(self, entry: LoggedAnswer) -> bool:
        """Queue an answer for writing; return False (and count it) when the queue is full, by count or by the
        bytes of text it holds (``queue_bytes``)."""
        size = _text_bytes(entry.request) + _text_bytes(entry.answer)
        with self._bytes_lock:
            fits = self._queued_bytes + size <= self.queue_bytes
            if fits:
                self._queued_bytes += size
        if fits:
            try:
                self._queue.put_nowait(entry)
                return True
            except queue.Full:
                with self._bytes_lock:
                    self._queued_bytes -= size
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("request log queue full: %d answers not logged so far", self.dropped)
        return False

    def _taken(self, entry: LoggedAnswer) -> None:
        with self._bytes_lock:
            self._queued_bytes -= _text_bytes(entry.request) + _text_bytes(entry.answer)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued answer is written; return False if that took longer than ``timeout``."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _writer(self) -> None:
        next_purge = time.monotonic() + self.purge_every_s
        stopping = False
        while not stopping:
            first = self._queue.get()
            taken = 1
            batch = [] if first is None else [first]
            stopping = first is None
            while not stopping and len(batch) < 256:  # what has piled up goes in one transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    stopping = True
                else:
                    batch.append(more)
            for entry in batch:
                self._taken(entry)
            try:
                if batch:
                    self._write(batch)
                if time.monotonic() > next_purge:
                    next_purge = time.monotonic() + self.purge_every_s
                    self.purge()
            except Exception:
                log.exception("request log writer error")
            finally:
                for _ in range(taken):
                    self._queue.task_done()

    def _write(self, batch: list[LoggedAnswer]) -> None:
        rows = []
        for entry in batch:
            try:
                rows.append(self._row(entry))
            except Exception as exc:  # noqa: BLE001 - one answer that cannot be stored never costs the others
                self.failed += 1
                log.error("request log: answer %s could not be prepared (%s)", entry.response_id, type(exc).__name__)
        if not rows:
            return
        with self._count_lock:
            if self._given_up:  # stop() has counted what was left
                return
            self._in_hand = len(rows)
        try:
            self._insert(rows)
        finally:
            with self._count_lock:
                self._in_hand = 0

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        attempt = 0
        while True:
            try:
                if not self._ready:
                    self.open()
                with self.engine.begin() as conn:
                    conn.execute(responses.insert(), rows)
                with self._count_lock:
                    self.written += len(rows)
                    if self._given_up:  # counted as lost by stop() a moment ago: they were written after all
                        self.failed -= len(rows)
                return
            except sa.exc.OperationalError as exc:
                # Locked or unreachable: wait and try again for as long as the endpoint runs (answers pile up in
                # the bounded queue meanwhile, and what does not fit there is counted as dropped).
                attempt += 1
                if self._stopping.is_set():
                    with self._count_lock:
                        if not self._given_up:
                            self.failed += len(rows)
                            log.error("request log: %d answers could not be written before shutdown", len(rows))
                    return
                log.warning("request log: database unavailable (%s), attempt %d; retrying", type(exc).__name__,
                            attempt)
                self._stopping.wait(min(30.0, 0.5 * attempt))
            except Exception:  # noqa: BLE001 - a retried id, or one row the database refuses: write them one by one
                break
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(responses.insert(), [row])
                self.written += 1
            except sa.exc.IntegrityError:
                log.warning("request log: answer %s already logged", row["response_id"])
            except Exception as exc:  # noqa: BLE001 - counted, and the rest of the batch is still written
                self.failed += 1
                log.error("request log: answer %s could not be written (%s)", row["response_id"], type(exc).__name__)

    def _scrub(self, text: str, counts: dict[str, int]) -> tuple[str, bool]:
        cut = len(text) > self.max_chars
        text = _storable(text[: self.max_chars], counts)
        clean, found = self.scrubber.scrub(text)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        return clean, cut

    def _scrub_tree(self, value: Any, counts: dict[str, int], cut: list[bool]) -> Any:
        """Scrub every string in a JSON-like value (strings one by one: scrubbing JSON text could break it)."""
        if isinstance(value, str):
            clean, was_cut = self._scrub(value, counts)
            cut[0] = cut[0] or was_cut
            return clean
        if isinstance(value, list):
            return [self._scrub_tree(v, counts, cut) for v in value]
        if isinstance(value, dict):
            return {_storable(str(k)[:200], counts): self._scrub_tree(v, counts, cut) for k, v in value.items()}
        return value

    def _row(self, e: LoggedAnswer) -> dict[str, Any]:
        counts: dict[str, int] = {}
        cut = [False]
        request = self._scrub_tree(e.request, counts, cut)
        answers = self._scrub_tree(list(e.answer), counts, cut)
        return {
            **{k: v for k, v in asdict(e).items() if k not in ("request", "answer", "citations")},
            "citations": None if e.citations is None else json.dumps(e.citations, ensure_ascii=False),
            "request": json.dumps(request, ensure_ascii=False), "answer": json.dumps(answers, ensure_ascii=False),
            "scrubbed": json.dumps(counts, sort_keys=True), "truncated": cut[0],
        }

    # -- feedback

    def add_feedback(self, response_id: str, key_id: str | None, rating: int, correction: str | None,
                     comment: str | None, at: datetime | None = None) -> dict[str, Any]:
        """Store ``key_id``'s feedback on one of its answers; a second rating of the same answer replaces the first.

        Raise UnknownResponse when this key was given no answer with that id, or the id is a shadow answer's (a
        candidate's answer kept for the log, never shown to anyone, so never rated). ``at``: when the rating was
        sent (default now); a rating sent before the stored one, written late, does not replace it.
        """
        self.flush()
        counts: dict[str, int] = {}
        correction = self._scrub(correction, counts)[0] if correction else None
        comment = self._scrub(comment, counts)[0] if comment else None
        created = at or datetime.now(UTC)
        values = {"created_at": created, "rating": rating, "correction": correction, "comment": comment}
        # One writer per process: a read-then-write under it cannot interleave with another post of this server.
        # Replicas sharing a database may still both insert; the statistics read one rating per answer and key.
        with self._feedback_lock, self.engine.begin() as conn:
            answer = conn.execute(sa.select(responses.c.model_version, responses.c.key_id, responses.c.model_role)
                                  .where(responses.c.response_id == response_id)).first()
            if answer is None or answer.key_id != key_id or answer.model_role == "shadow":
                raise UnknownResponse(response_id)
            mine = feedback.c.key_id.is_(None) if key_id is None else feedback.c.key_id == key_id
            earlier = conn.execute(sa.select(feedback.c.feedback_id, feedback.c.created_at, feedback.c.rating)
                                   .where(feedback.c.response_id == response_id, mine)
                                   .order_by(feedback.c.feedback_id.desc())).first()
            replaced = False
            if earlier is not None:
                feedback_id = earlier.feedback_id
                replaced = _aware(earlier.created_at) <= created
                if replaced:
                    conn.execute(feedback.update().where(feedback.c.feedback_id == feedback_id).values(**values))
                else:  # a newer rating is stored already: this one, sent earlier, arrived late
                    rating, created = earlier.rating, _aware(earlier.created_at)
            else:
                feedback_id = conn.execute(feedback.insert().values(
                    response_id=response_id, key_id=key_id, model_version=answer.model_version, **values,
                )).inserted_primary_key[0]
        return {"id": f"fb-{feedback_id}", "object": "feedback", "response_id": response_id,
                "model_version": answer.model_version, "rating": rating, "created": int(created.timestamp()),
                "replaced": replaced, "scrubbed": counts}

    # -- reading

    def answer(self, response_id: str) -> dict[str, Any] | None:
        """Return the logged answer with its feedback, or None."""
        self.flush()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(responses).where(responses.c.response_id == response_id)).mappings().first()
            if row is None:
                return None
            notes = conn.execute(sa.select(feedback).where(feedback.c.response_id == response_id)
                                 .order_by(feedback.c.feedback_id)).mappings().all()
        out = dict(row)
        out["request"] = json.loads(out["request"])
        out["answer"] = json.loads(out["answer"])
        out["scrubbed"] = json.loads(out["scrubbed"])
        out["citations"] = json.loads(out["citations"]) if out.get("citations") else None
        out["created_at"] = _aware(out["created_at"]).isoformat()
        out["feedback"] = [{**dict(n), "created_at": _aware(n["created_at"]).isoformat()} for n in notes]
        return out

    def answers_between(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        """Return the answers logged in [start, end) that a user saw (shadows and abandoned answers left out),
        at most ``limit`` per model version, the newest first: scrubbed text, tokens, seconds, finish and the
        scrubber's counts (what was found before scrubbing, never the values)."""
        self.flush()
        columns = (responses.c.response_id, responses.c.created_at, responses.c.route, responses.c.model_version,
                   responses.c.model_role, responses.c.request, responses.c.answer, responses.c.finish,
                   responses.c.prompt_tokens, responses.c.completion_tokens, responses.c.seconds,
                   responses.c.scrubbed)
        out: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            versions = conn.execute(sa.select(responses.c.model_version).distinct().where(
                responses.c.created_at >= start, responses.c.created_at < end)).scalars().all()
            for version in sorted(versions):
                rows = conn.execute(sa.select(*columns).where(
                    responses.c.created_at >= start, responses.c.created_at < end,
                    responses.c.model_version == version, responses.c.model_role != "shadow", _not_abandoned(),
                ).order_by(responses.c.created_at.desc()).limit(limit)).mappings().all()
                for row in rows:
                    entry = dict(row)
                    entry["request"] = json.loads(entry["request"])
                    entry["answer"] = json.loads(entry["answer"])
                    entry["scrubbed"] = json.loads(entry["scrubbed"] or "{}")
                    entry["created_at"] = _aware(entry["created_at"])
                    out.append(entry)
        return out

    def feedback_since(self, since: datetime, limit: int) -> list[dict[str, Any]]:
        """Return the newest rating of each answer rated since ``since`` (shadows and abandoned answers left out),
        the oldest first, at most ``limit``: the answer's scrubbed request and text, the rating, the scrubbed
        correction, the model version and when it was rated."""
        self.flush()
        query = (sa.select(feedback.c.feedback_id, feedback.c.response_id, feedback.c.rating, feedback.c.correction,
                           feedback.c.created_at, feedback.c.model_version, responses.c.request,
                           responses.c.answer, responses.c.route)
                 .join(responses, responses.c.response_id == feedback.c.response_id)
                 .where(feedback.c.created_at >= since, responses.c.model_role != "shadow", _not_abandoned())
                 .order_by(feedback.c.created_at, feedback.c.feedback_id))
        newest: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                entry = dict(row)
                entry["request"] = json.loads(entry["request"])
                entry["answer"] = json.loads(entry["answer"])
                entry["created_at"] = _aware(entry["created_at"])
                newest.pop(entry["response_id"], None)
                newest[entry["response_id"]] = entry
        return list(newest.values())[:limit]

    def _votes(self, conn, since: datetime, versions: list[int] | None = None,
               prompt: str | None = None) -> dict[int, list[float]]:
        """Return per model version (with ``prompt``: per version of that prompt, champion answers only) one vote
        per rater: the mean of that key's ratings of its answers (the newest rating of each answer). A key that
        rates twenty answers, or one answer twenty times, is one voter; answers given without a key are each a
        voter of their own. Shadow answers, and answers their clients abandoned, never count."""
        group, where = _grouping(prompt)
        query = (sa.select(feedback.c.feedback_id, feedback.c.response_id, feedback.c.key_id, feedback.c.rating,
                           group.label("model_version"))
                 .join(responses, responses.c.response_id == feedback.c.response_id)
                 .where(feedback.c.created_at >= since, responses.c.model_role != "shadow", _not_abandoned(), *where))
        if versions is not None:
            query = query.where(group.in_(versions))
        newest: dict[tuple[str, str | None], tuple[int, int, float]] = {}
        for row in conn.execute(query):
            key = (row.response_id, row.key_id)
            if key not in newest or row.feedback_id > newest[key][0]:
                newest[key] = (row.feedback_id, int(row.model_version), float(row.rating))
        raters: dict[tuple[int, str], list[float]] = {}
        for (response_id, key_id), (_id, version, rating) in newest.items():
            voter = f"key:{key_id}" if key_id is not None else f"answer:{response_id}"
            raters.setdefault((version, voter), []).append(rating)
        votes: dict[int, list[float]] = {}
        for (version, _voter), ratings in raters.items():
            votes.setdefault(version, []).append(sum(ratings) / len(ratings))
        return votes

    def feedback_summary(self, since: datetime | None = None) -> dict[int, dict[str, float]]:
        """Return per model version: answers, raters (``ratings``: distinct keys, see ``_votes``), their mean
        vote and the share of raters whose vote is negative."""
        since = since or datetime(1970, 1, 1, tzinfo=UTC)
        with self.engine.connect() as conn:
            answered = dict(conn.execute(
                sa.select(responses.c.model_version, sa.func.count())
                .where(responses.c.created_at >= since, responses.c.model_role != "shadow", _not_abandoned())
                .group_by(responses.c.model_version)).all())
            votes = self._votes(conn, since)
        nan = float("nan")
        out = {int(v): {"answers": float(n), "ratings": 0.0, "mean_rating": nan, "negative_share": nan}
               for v, n in answered.items()}
        for version, cast in votes.items():
            out.setdefault(version, {"answers": 0.0}).update(
                ratings=float(len(cast)), mean_rating=sum(cast) / len(cast),
                negative_share=sum(1 for v in cast if v < 0) / len(cast))
        return out

    def window_stats(self, since: datetime, versions: list[int],
                     prompt: str | None = None) -> dict[int, dict[str, float]]:
        """Return per version, for answers since ``since`` (abandoned ones left out): answers, errors (timeouts,
        failures), p95 seconds,
        raters and the share of them whose vote is negative (the live signals of a rollout step; one vote per
        key, see ``_votes``, so that one user cannot decide a rollout). Versions are model versions; with
        ``prompt``, versions of that prompt template, counted over the champion's answers."""
        self.flush()
        out = {}
        group, where = _grouping(prompt)
        with self.engine.connect() as conn:
            votes = self._votes(conn, since, versions, prompt)
            for version in versions:
                rows = conn.execute(sa.select(responses.c.seconds, responses.c.finish).where(
                    group == version, responses.c.created_at >= since, *where)).all()
                # An answer its client abandoned says nothing of latency or errors, and is not counted as one.
                rows = [r for r in rows if "cancelled" not in (r.finish or "").split(",")]
                seconds = sorted(r.seconds for r in rows if r.seconds is not None)
                errors = sum(1 for r in rows if any(f in ("timeout", "error") for f in (r.finish or "").split(",")))
                ratings = votes.get(version, [])
                p95 = seconds[min(len(seconds) - 1, math.ceil(0.95 * len(seconds)) - 1)] if seconds else math.nan
                out[version] = {
                    "answers": float(len(rows)), "errors": float(errors), "p95_seconds": float(p95),
                    "ratings": float(len(ratings)),
                    "negative_share": sum(1 for r in ratings if r < 0) / len(ratings) if ratings else math.nan,
                }
        return out

    def sample_answers(self, since: datetime, version: int, limit: int,
                       prompt: str | None = None) -> list[tuple[str, str, str]]:
        """Return up to ``limit`` answered (question, answer) pairs of a version (with ``prompt``: of that prompt's
        version, champion answers) since a time, as ``(response_id, question, answer)``: the newest first, errors
        and abandoned answers left out; all text already scrubbed."""
        self.flush()
        group, where = _grouping(prompt)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(responses.c.response_id, responses.c.request, responses.c.answer, responses.c.finish)
                .where(group == version, responses.c.created_at >= since, *where,
                       *(sa.not_(responses.c.finish.contains(f)) for f in ("cancelled", "timeout", "error")))
                .order_by(responses.c.created_at.desc()).limit(limit * 2)).all()
        out = []
        for row in rows:
            if any(f in ("timeout", "error", "cancelled") for f in (row.finish or "").split(",")):
                continue
            request, answers = json.loads(row.request), json.loads(row.answer)
            if isinstance(request, list) and request and isinstance(request[0], dict):  # chat: the last user turn
                users = [m.get("content") for m in request if m.get("role") == "user"]
                question = users[-1] if users else ""
            else:
                question = request[0] if request and isinstance(request[0], str) else ""
            if isinstance(question, list):
                question = " ".join(str(p.get("text", "")) for p in question if isinstance(p, dict))
            if question and answers:
                out.append((row.response_id, str(question), str(answers[0])))
            if len(out) >= limit:
                break
        return out

    def purge(self, now: datetime | None = None) -> int:
        """Delete answers (and their feedback) older than the retention; return how many answers went."""
        cutoff = (now or datetime.now(UTC)) - self.retention
        with self.engine.begin() as conn:
            old = sa.select(responses.c.response_id).where(responses.c.created_at < cutoff)
            conn.execute(feedback.delete().where(feedback.c.response_id.in_(old)))
            deleted = conn.execute(responses.delete().where(responses.c.created_at < cutoff)).rowcount
        if deleted:
            log.info("request log: %d answers older than %s deleted (retention)", deleted, self.retention)
        return deleted


def _text_bytes(value: Any) -> int:
    """Return about how many bytes the strings of a JSON-like value take (characters counted, as queued)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_bytes(v) for v in value)
    return 8


def _storable(text: str, counts: dict[str, int]) -> str:
    """Return ``text`` as every database stores it: a lone surrogate (no text, refused by UTF-8) and NUL (refused
    by PostgreSQL) become U+FFFD, counted as ``invalid_text``; valid surrogate pairs become their character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        lone = fixed.count("\ufffd") - text.count("\ufffd")
        if lone:
            counts["invalid_text"] = counts.get("invalid_text", 0) + lone
        text = fixed
    if "\x00" in text:
        counts["invalid_text"] = counts.get("invalid_text", 0) + text.count("\x00")
        text = text.replace("\x00", "\ufffd")
    return text


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _grouping(prompt: str | None):
    """Return the column answers are grouped by, and the conditions that pick them: model versions, or (a prompt's
    rollout) that prompt's versions over the champion's answers, so a model canary running beside it is not mixed
    in."""
    if prompt is None:
        return responses.c.model_version, ()
    return responses.c.prompt_version, (responses.c.prompt_name == prompt, responses.c.model_role == "champion")


def _not_abandoned():
    """The SQL condition of an answer its client did not abandon (no ``cancelled`` among its finish reasons)."""
    return sa.not_(responses.c.finish.contains("cancelled"))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
