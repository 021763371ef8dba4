"""Promotion history: every move of the champion alias, kept in the registry's own metadata store.

Each move is a tag of the registered model (``nightshift.champion_move.<id>``, a JSON record), so it lives
in MLflow's database next to the alias it describes (SQLite here, PostgreSQL in production) and needs no
file of its own. A move is written in three steps: the record as ``pending`` (with the version the alias
points at now), the alias, then the record as ``done`` with the time. The id comes from the caller (the
DAG run's task), so a retry after a kill at any line finds its own record, keeps its original
``from_version`` and finishes the move; moving to where the alias already is records nothing new.

A move is a compare-and-set under the model's release lease (registry/lease.py): the alias moves only if it
still names the version the move was decided against (``expected``); otherwise ChampionConflict is raised and
nothing is written.

A retry that finds its record pending cannot tell from the alias alone whether its alias write happened: other
moves may have run between the tries (an A-B-A). Every record is written under the lease with the alias it found
(``from_version``) at ``requested_at``, so the first record requested after this one says what the alias was
once this move's worker stopped:

- none: the alias names ``from_version`` (the move is made now) or ``to_version`` (it was made: the record is
  finished); anything else was moved outside nightshift.
- its ``from_version`` is this move's ``to_version``: the move was made before it, and is recorded as done at
  its ``requested_at`` (so it sorts before the later ones); the alias is not touched.
- its ``from_version`` is this move's ``from_version``: the move never happened. It is made now only if the
  alias names that version again (the champion it was decided against); otherwise it is marked ``aborted``
  (the history reads as if it never happened) and ChampionConflict is raised, unless the alias names its
  target already (then, as for a new move, nothing is recorded and nothing raised).
- anything else (the alias was moved outside nightshift): marked ``aborted``, ChampionConflict.

The records are read and written under the lease, so "requested after" orders the moves; a move made now after
such a wait is requested anew (``requested_at`` rewritten before the alias) for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from nightshift.faults import fault_point
from nightshift.records import ChampionMove, ModelVersionRecord
from nightshift.registry.common import PROMOTED_TAG, names_nothing
from nightshift.registry.lease import DEFAULT_TIMEOUT_S, Lease, registry_lease

if TYPE_CHECKING:
    from nightshift.registry.mlflow_registry import ModelRegistry

log = logging.getLogger(__name__)

MOVE_TAG = "nightshift.champion_move."
DECLINE_TAG = "nightshift.release_declined."
"""A release a person (or the approval's timeout) rejected: a record of its own, never read as a move."""
MAX_REASON_CHARS = 1000
MAX_EVIDENCE_CHARS = 1500
NO_CHAMPION = "no-champion"
"""As ``expected``: the move was decided when there was no champion, and must find none."""
# What to do after a conflict, by the kind of move.
AGAIN = {
    "promotion": "trigger finetune_model again to evaluate the candidate against the current champion",
    "rollout": "trigger rollout_model again to compare the candidate with the current champion on live traffic",
    "rollback": "look at the promotion history (nightshift history) and trigger rollback_model again if it is "
                "still needed",
}


class ChampionConflict(RuntimeError):
    """The champion alias no longer names the version a move was decided against; the move was not made now.

    The message says whether it never reached the alias, or (after a move outside nightshift) cannot be told.
    """

    def __init__(self, message: str, current: int | None, expected: int | None, target: int) -> None:
        super().__init__(message)
        self.current = current
        self.expected = expected
        self.target = target


def _label(version: int | None) -> str:
    return f"v{version}" if version is not None else "no version (no champion)"


def next_stamp(records: dict[str, ChampionMove] | list[ChampionMove]) -> str:
    """Return now, or just after the newest time any record holds when this worker's clock is behind it.

    Moves are ordered by these times (resumes, ``moves()``, ``champion_at``); a worker whose clock runs behind
    another's must still stamp after every move already written. Every stamp is taken under the lease.
    """
    now = datetime.now(UTC)
    for move in (records.values() if isinstance(records, dict) else records):
        for stamp in (move.requested_at, move.at):
            if stamp:
                try:
                    now = max(now, parse_time(stamp) + timedelta(microseconds=1))
                except ValueError:
                    continue
    return now.isoformat(timespec="microseconds")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time; a time without a zone is UTC. Raise ValueError that says what is expected."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("expected an ISO 8601 time such as 2026-12-01T09:30:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def move_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


class PromotionHistory:
    """Reads and writes the champion's moves for one registered model."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def _model_tags(self) -> dict[str, str]:
        """Return the registered model's tags ({} before it exists); raise when the registry cannot be read."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.registry.client.get_registered_model(self.registry.model_name).tags or {})
        except MlflowException as exc:
            if names_nothing(exc):
                return {}
            raise  # read as "no history", a pending move would be started afresh from the wrong champion

    def _records(self) -> dict[str, ChampionMove]:
        """Return every readable record by id, whatever its state."""
        out = {}
        for key, value in self._model_tags().items():
            if not key.startswith(MOVE_TAG):
                continue
            try:
                move = ChampionMove.from_dict(json.loads(value))
            except (ValueError, TypeError):
                log.warning("ignoring an unreadable history record %s", key)
                continue
            out[key.removeprefix(MOVE_TAG)] = move
        return out

    def _write(self, move: ChampionMove) -> None:
        # Bounded parts (reason, evidence strings) keep a record well inside the store's tag size (5,000).
        self.registry.client.set_registered_model_tag(self.registry.model_name, MOVE_TAG + move.id,
                                                      json.dumps(move.to_dict(), sort_keys=True))

    def moves(self, include_pending: bool = False) -> list[ChampionMove]:
        """Return the recorded moves, oldest first; aborted ones never count, pending ones on request."""
        out = [move for move in self._records().values()
               if move.state == "done" or (include_pending and move.state == "pending")]
        return sorted(out, key=lambda mv: (mv.at or mv.requested_at, mv.requested_at))

    def declines(self) -> list[ChampionMove]:
        """Return the releases that were declined (state ``rejected``), oldest first."""
        out = []
        for key, value in self._model_tags().items():
            if key.startswith(DECLINE_TAG):
                try:
                    out.append(ChampionMove.from_dict(json.loads(value)))
                except (ValueError, TypeError):
                    log.warning("ignoring an unreadable history record %s", key)
        return sorted(out, key=lambda mv: mv.at)

    def decline(self, target: ModelVersionRecord, key: str, by: str, dag_run: str, reason: str,
                evaluation: dict[str, Any] | None = None) -> ChampionMove:
        """Record that the release of ``target`` was declined (who, why); the alias is not touched.

        ``key`` names the decision (the DAG run's task): a retry finds the record it wrote and returns it.
        """
        mid = move_id(key)
        tag = DECLINE_TAG + mid
        found = self._model_tags().get(tag)
        if found:
            return ChampionMove.from_dict(json.loads(found))
        champion = self.registry.champion()
        record = ChampionMove(
            id=mid, to_version=target.version, from_version=champion.version if champion else None,
            kind="promotion", by=by[:200], dag_run=dag_run[:250], reason=reason[:MAX_REASON_CHARS],
            evaluation={k: v[:MAX_EVIDENCE_CHARS] if isinstance(v, str) else v for k, v in (evaluation or {}).items()},
            requested_at=now_iso(), at=now_iso(), state="rejected")
        self.registry.client.set_registered_model_tag(self.registry.model_name, tag,
                                                      json.dumps(record.to_dict(), sort_keys=True))
        log.info("the release of %s v%d was declined by %s", self.registry.model_name, target.version, record.by)
        return record

    def get(self, move_key: str) -> ChampionMove | None:
        raw = self._model_tags().get(MOVE_TAG + move_id(move_key))
        return ChampionMove.from_dict(json.loads(raw)) if raw else None

    def champion_at(self, when: datetime) -> dict[str, Any]:
        """Return which version was champion at ``when``: ``{"version", "since", "move"}`` (version None if none)."""
        moves = self.moves()
        current: dict[str, Any] = {"version": None, "since": None, "move": None}
        if moves and moves[0].from_version is not None and when < parse_time(moves[0].at):
            # Before the first recorded move, its from_version was champion (since an unrecorded time).
            return {"version": moves[0].from_version, "since": None, "move": None}
        for move in moves:
            if parse_time(move.at) <= when:
                current = {"version": move.to_version, "since": move.at, "move": move.id}
        return current

    def move(
        self, target: ModelVersionRecord, key: str, kind: str, by: str, dag_run: str, reason: str,
        evaluation: dict[str, Any] | None = None, expected: int | str | None = None,
        lease_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ChampionMove | None:
        """Point the champion alias at ``target`` and record the move; None when it already was the champion.

        ``key`` names the move (the DAG run and task): a retry with the same key resumes the same move.
        ``expected``: the champion the move was decided against (a version number, or NO_CHAMPION); when the
        alias names another, ChampionConflict is raised and nothing is written. None: no check.
        """
        with registry_lease(self.registry, f"{kind} {dag_run or move_id(key)}", lease_timeout_s) as lease:
            return self._move(target, key, kind, by, dag_run, reason, evaluation, expected, lease)

    def _move(
        self, target: ModelVersionRecord, key: str, kind: str, by: str, dag_run: str, reason: str,
        evaluation: dict[str, Any] | None, expected: int | str | None, lease: Lease,
    ) -> ChampionMove | None:
        """Return the finished move (None: the alias named the target already); the caller holds ``lease``."""
        mid = move_id(key)
        records = self._records()
        record = records.get(mid)
        if record is not None and record.state == "done":
            log.info("move %s was already made (to v%d)", mid, record.to_version)
            return record
        champion = self.registry.champion()
        current = champion.version if champion else None
        if record is None or record.state == "aborted":  # an aborted move tried again is a new compare-and-set
            if current == target.version:
                return None
            if expected is not None:
                wanted = None if expected == NO_CHAMPION else int(expected)
                if current != wanted:
                    raise self._conflict(kind, target.version, current, wanted)
            record = ChampionMove(
                id=mid, to_version=target.version, from_version=current, kind=kind,
                by=by[:200], dag_run=dag_run[:250], reason=reason[:MAX_REASON_CHARS],
                evaluation={k: v[:MAX_EVIDENCE_CHARS] if isinstance(v, str) else v
                            for k, v in (evaluation or {}).items()},
                requested_at=next_stamp(records),
            )
            self._write(record)
            fault_point("history.before_alias")
        else:
            resumed = self._resume(record, current, records)
            if resumed is None or resumed.state == "done":
                return resumed
            record = resumed
        lease.check()  # a lease lost since it was taken no longer keeps other moves out
        self.registry.client.set_registered_model_alias(self.registry.model_name, self.registry.alias,
                                                        str(record.to_version))
        fault_point("registry.after_alias")
        self.registry.client.set_model_version_tag(self.registry.model_name, str(record.to_version), PROMOTED_TAG,
                                                   datetime.now(UTC).isoformat(timespec="seconds"))
        done = ChampionMove.from_dict({**record.to_dict(), "at": next_stamp({**records, record.id: record}),
                                       "state": "done"})
        self._write(done)
        log.info("%s@%s moved from %s to v%d (%s)", self.registry.model_name, self.registry.alias,
                 f"v{done.from_version}" if done.from_version else "nothing", done.to_version, kind)
        return done

    def _resume(self, record: ChampionMove, current: int | None,
                records: dict[str, ChampionMove]) -> ChampionMove | None:
        """Return the pending ``record`` to make now, finished (state ``done``) when it was made before, or None
        when it never happened but other moves have since brought the alias to its target.

        Raise ChampionConflict, the record marked aborted, when making it now would undo other moves.
        """
        since = parse_time(record.requested_at)
        later = sorted((m for i, m in records.items() if i != record.id and m.requested_at
                        and parse_time(m.requested_at) > since), key=lambda m: parse_time(m.requested_at))
        # What the alias was once this move's worker stopped: the next move read it; with none, it still is.
        found = later[0].from_version if later else current
        if found == record.to_version:
            return self._made_before(record)
        if found == record.from_version and current == record.from_version:
            if not later:
                return record
            # Never made, and the champion is again the one it was decided against (A-B-A): make it now as a move
            # requested now, written before the alias, so that a retry places it after the moves it waited for.
            record = ChampionMove.from_dict({**record.to_dict(), "requested_at": next_stamp(records)})
            self._write(record)
            return record
        self._write(ChampionMove.from_dict({**record.to_dict(), "state": "aborted"}))
        if found == record.from_version and current == record.to_version:
            # Never made, but the champion is its target already: as for a new move to where the alias is,
            # nothing is recorded (the history reads as if it never happened) and nothing is undone.
            log.info("move %s never reached the alias; other moves have since made v%d champion", record.id,
                     record.to_version)
            return None
        outcome = "never" if found == record.from_version else "unknown"
        raise self._conflict(record.kind, record.to_version, current, record.from_version, outcome)

    def _made_before(self, record: ChampionMove) -> ChampionMove:
        """Return ``record`` finished as done when it was made: its alias write happened before its worker stopped."""
        tags = self.registry.version_tags(record.to_version)
        if not tags.get(PROMOTED_TAG):
            self.registry.client.set_model_version_tag(
                self.registry.model_name, str(record.to_version), PROMOTED_TAG,
                parse_time(record.requested_at).isoformat(timespec="seconds"))
        done = ChampionMove.from_dict({**record.to_dict(), "at": record.requested_at, "state": "done"})
        self._write(done)
        log.info("%s@%s had moved from %s to v%d (%s) before its worker stopped: recorded as done",
                 self.registry.model_name, self.registry.alias, _label(done.from_version), done.to_version, done.kind)
        return done

    def _conflict(self, kind: str, target: int, current: int | None, expected: int | None,
                  outcome: str = "fresh") -> ChampionConflict:
        """Return the error for a move whose champion changed, saying what happened and what to do.

        ``outcome``: ``fresh`` (nothing was written), ``never`` (a pending move that never reached the alias,
        now aborted) or ``unknown`` (a pending move, now aborted, that the recorded moves cannot place).
        """
        decided = "was planned when the champion was" if kind == "rollback" else "was evaluated against"
        what = {
            "fresh": "the champion changed in between, so nothing was moved and the promotion history is unchanged",
            "never": "it was interrupted before it moved the alias and the champion changed before it was retried, "
                     "so nothing was moved; it is recorded as aborted (the history reads as if it never happened)",
            "unknown": "it was interrupted, and the moves recorded since do not explain how the alias got there (it "
                       "was moved outside nightshift), so whether this move ever reached the alias cannot be told; "
                       "the alias is left as it is and the move is recorded as aborted. Check the registry and "
                       "nightshift history, then",
        }[outcome]
        again = AGAIN.get(kind, "start the move again")
        message = (f"{self.registry.model_name}@{self.registry.alias} is now {_label(current)}, but this {kind} to "
                   f"v{target} {decided} {_label(expected)}: {what}{' ' if outcome == 'unknown' else '; '}{again}")
        log.warning("%s", message)
        return ChampionConflict(message, current, expected, target)
