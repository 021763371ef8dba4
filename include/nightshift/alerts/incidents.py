"""Incidents instead of alerts: one alert when a check starts failing, a reminder only after a quiet interval while
it keeps failing, and a "resolved" message when it passes again (as Alertmanager groups, repeats and resolves,
and PagerDuty deduplicates by key).

Every check has a fingerprint (the DAG, the check, its subject: a model version, a dataset, the traffic). The
state lives in a database table, so the decision survives the task that made it: a retried task meets the same
evaluation key and never sends a notice twice; a notice decided but not yet delivered (the task died between)
is handed out again until ``delivered`` is recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()
incidents = sa.Table(
    "nightshift_incidents", metadata,
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("check_name", sa.String(100), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("title", sa.String(500), nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_sent_at", sa.DateTime(timezone=True)),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_evaluation", sa.String(64), nullable=False),  # a hash of the last evaluation's key
    sa.Column("pending", sa.String(16)),
    sa.Column("decided_at", sa.DateTime(timezone=True)),
    sa.Column("details", sa.JSON),
)
retrains = sa.Table(
    "nightshift_retrains", metadata,
    sa.Column("name", sa.String(64), primary_key=True),  # one row: the rate limit's slot
    sa.Column("evaluation", sa.String(64), nullable=False),  # a hash of the evaluation that last started one
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.String(1000), nullable=False),
)
NEVER = datetime(1970, 1, 1, tzinfo=UTC)

CARRY_AFTER = timedelta(minutes=10)
"""A notice decided this long ago and still not delivered is carried to the next evaluation; a younger one
belongs to a run still sending it (two runs racing must not both send it)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check in one evaluation (a DAG run): failing or not, and what to tell people."""

    dag_id: str
    check: str
    subject: str
    """What the check is about: ``v3`` (a model version), ``corpus`` (a dataset), ``traffic``."""
    failing: bool
    title: str
    message: str = ""
    severity: str = "warning"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.dag_id}\0{self.check}\0{self.subject}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Notice:
    """A message to send about an incident: it opened, it still fails (a reminder), or it resolved."""

    kind: str
    fingerprint: str
    title: str
    message: str
    severity: str
    opened_at: datetime
    failures: int
    details: dict[str, Any]


class IncidentBook:
    """The incidents of one installation, in a SQLAlchemy database (SQLite by default, PostgreSQL beyond)."""

    def __init__(self, url: str, repeat_after: timedelta) -> None:
        self.url = url
        self.repeat_after = repeat_after
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            if self.engine.url.database and self.engine.url.database != ":memory:":
                from pathlib import Path

                Path(self.engine.url.database).parent.mkdir(parents=True, exist_ok=True)
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        metadata.create_all(self.engine)

    def observe(self, result: CheckResult, evaluation: str, now: datetime | None = None) -> Notice | None:
        """Record a check's outcome in an evaluation; return the notice to send now, or None.

        The same ``evaluation`` (a DAG run's key) applied twice decides nothing new: a notice not yet marked
        delivered comes back, a delivered one does not. A notice a failed delivery left behind is carried to the
        next evaluation (an incident that opened while the channel was down is still announced as opened).
        """
        now = now or datetime.now(UTC)
        key = _key(evaluation)
        for attempt in range(3):
            try:
                return self._observe(result, key, now)
            except sa.exc.IntegrityError:  # another observer inserted the incident first: read its row again
                if attempt == 2:
                    raise
        return None

    def _observe(self, result: CheckResult, key: str, now: datetime) -> Notice | None:
        where = incidents.c.fingerprint == result.fingerprint
        details = {"message": result.message, "severity": result.severity, **result.details}
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(incidents).where(where).with_for_update()).first()
            if row is not None and row.last_evaluation == key:
                return self._notice(row, row.pending) if row.pending else None
            carried = (row.pending if row is not None and row.pending and row.decided_at is not None
                       and _aware(row.decided_at) + CARRY_AFTER <= now else None)  # decided earlier, undelivered
            if row is not None and row.pending and not carried:
                return None  # another run decided a notice moments ago and is sending it: leave it to that run
            if row is None or row.state == "resolved":
                if not result.failing:
                    if row is not None:
                        conn.execute(incidents.update().where(where).values(last_evaluation=key, pending=carried))
                        if not carried:
                            return None
                        row = conn.execute(sa.select(incidents).where(where)).first()
                    return self._notice(row, row.pending) if row is not None and row.pending else None
                values = {"dag_id": result.dag_id, "check_name": result.check, "subject": result.subject[:200],
                          "state": "open", "title": result.title[:500], "opened_at": now, "last_sent_at": None,
                          "resolved_at": None, "failures": 1, "last_evaluation": key, "pending": "opened",
                          "decided_at": now, "details": details}
                if row is None:
                    conn.execute(incidents.insert().values(fingerprint=result.fingerprint, **values))
                else:
                    conn.execute(incidents.update().where(where).values(**values))
            elif result.failing:
                last = row.last_sent_at
                due = carried or ("repeat" if last is None or _aware(last) + self.repeat_after <= now else None)
                conn.execute(incidents.update().where(where).values(
                    failures=row.failures + 1, last_evaluation=key, title=result.title[:500], pending=due,
                    decided_at=now if due and not carried else row.decided_at, details=details))
            else:
                conn.execute(incidents.update().where(where).values(
                    state="resolved", resolved_at=now, last_evaluation=key, pending="resolved", decided_at=now))
            row = conn.execute(sa.select(incidents).where(where)).first()
        return self._notice(row, row.pending) if row.pending else None

    def claim_retrain(self, evaluation: str, at: datetime, every: timedelta, reason: str) -> dict[str, Any]:
        """Take the one retrain a rate limit allows per ``every``: granted when the last one started at least
        ``every`` before ``at`` (the time the evaluation judged), or when this evaluation took it already (a retried
        task starts the same retrain again, which its run id makes a no-op). Two evaluations racing: one wins.

        Return ``{"granted", "last_at", "last_reason"}`` (the last retrain's, when refused)."""
        key = _key(evaluation)
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            conn.execute(insert(retrains).values(name="retrain", evaluation="", at=NEVER, reason="")
                         .on_conflict_do_nothing(index_elements=["name"]))
            took = conn.execute(retrains.update().where(
                retrains.c.name == "retrain", sa.or_(retrains.c.at <= at - every, retrains.c.evaluation == key))
                .values(evaluation=key, at=at, reason=reason[:1000])).rowcount
            row = conn.execute(sa.select(retrains).where(retrains.c.name == "retrain")).first()
        return {"granted": bool(took), "last_at": _aware(row.at).isoformat(), "last_reason": row.reason}

    def stale(self, dag_id: str, checked: set[str]) -> list[CheckResult]:
        """Return passing results for this DAG's open incidents that no check of the evaluation produced (a model
        version that no longer answers, a check that could not be judged): they resolve as no longer failing."""
        out = []
        for row in self.open_incidents():
            if row["dag_id"] == dag_id and row["fingerprint"] not in checked:
                out.append(CheckResult(row["dag_id"], row["check_name"], row["subject"], False, row["title"],
                                       "The check no longer applies (nothing to judge this time)."))
        return out

    def delivered(self, fingerprint: str, evaluation: str, now: datetime | None = None) -> None:
        """Record that the notice an evaluation decided was sent: a retry of that evaluation sends nothing, and
        the next reminder is due ``repeat_after`` from now."""
        with self.engine.begin() as conn:
            conn.execute(incidents.update().where(incidents.c.fingerprint == fingerprint,
                                                  incidents.c.last_evaluation == _key(evaluation))
                         .values(pending=None, last_sent_at=now or datetime.now(UTC)))

    def open_incidents(self) -> list[dict[str, Any]]:
        """Return the incidents still open, the oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(incidents).where(incidents.c.state == "open")
                                .order_by(incidents.c.opened_at)).mappings().all()
        return [{**dict(r), "opened_at": _aware(r["opened_at"]).isoformat()} for r in rows]

    def _notice(self, row, kind: str) -> Notice:
        details = dict(row.details or {})
        message = details.pop("message", "")
        severity = details.pop("severity", "warning")
        prefix = {"opened": "", "repeat": "still failing: ", "resolved": "resolved: "}[kind]
        opened = _aware(row.opened_at)
        if kind == "repeat":
            message = f"{message}\nOpen since {opened.isoformat(timespec='minutes')}, failing {row.failures} times."
        if kind == "resolved":
            since = opened.isoformat(timespec="minutes")
            message = f"The check passes again (it failed {row.failures} times since {since})."
            severity = "info"
        return Notice(kind, row.fingerprint, prefix + row.title, message, severity, opened, row.failures, details)


def _key(evaluation: str) -> str:
    """Return the stored form of an evaluation's key: a hash, so that any run id fits the column."""
    return hashlib.sha256(evaluation.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun explicitly (BEGIN IMMEDIATE)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
