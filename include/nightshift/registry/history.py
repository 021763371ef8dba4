"""Promotion history: every move of the champion alias, kept in the registry's own metadata store.

Each move is a tag of the registered model (``nightshift.champion_move.<id>``, a JSON record), so it lives
in MLflow's database next to the alias it describes (SQLite here, PostgreSQL in production) and needs no
file of its own. A move is written in three steps: the record as ``pending`` (with the version the alias
points at now), the alias, then the record as ``done`` with the time. The id comes from the caller (the
DAG run's task), so a retry after a kill at any line finds its own record, keeps its original
``from_version`` and finishes the move; moving to where the alias already is records nothing new.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from nightshift.faults import fault_point
from nightshift.records import ChampionMove, ModelVersionRecord
from nightshift.registry.mlflow_registry import PROMOTED_TAG, ModelRegistry

log = logging.getLogger(__name__)

MOVE_TAG = "nightshift.champion_move."
MAX_REASON_CHARS = 1000
MAX_EVIDENCE_CHARS = 1500


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
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.registry.client.get_registered_model(self.registry.model_name).tags or {})
        except MlflowException:
            return {}

    def _write(self, move: ChampionMove) -> None:
        # Bounded parts (reason, evidence strings) keep a record well inside the store's tag size (5,000).
        self.registry.client.set_registered_model_tag(self.registry.model_name, MOVE_TAG + move.id,
                                                      json.dumps(move.to_dict(), sort_keys=True))

    def moves(self, include_pending: bool = False) -> list[ChampionMove]:
        """Return the recorded moves, oldest first."""
        out = []
        for key, value in self._model_tags().items():
            if not key.startswith(MOVE_TAG):
                continue
            try:
                move = ChampionMove.from_dict(json.loads(value))
            except (ValueError, TypeError):
                log.warning("ignoring an unreadable history record %s", key)
                continue
            if move.state == "done" or include_pending:
                out.append(move)
        return sorted(out, key=lambda mv: (mv.at or mv.requested_at, mv.requested_at))

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
        evaluation: dict[str, Any] | None = None,
    ) -> ChampionMove | None:
        """Point the champion alias at ``target`` and record the move; None when it already was the champion.

        ``key`` names the move (the DAG run and task): a retry with the same key resumes the same move.
        """
        mid = move_id(key)
        record = self.get(key)
        if record is not None and record.state == "done":
            log.info("move %s was already made (to v%d)", mid, record.to_version)
            return record
        if record is None:
            champion = self.registry.champion()
            if champion is not None and champion.version == target.version:
                return None
            record = ChampionMove(
                id=mid, to_version=target.version, from_version=champion.version if champion else None, kind=kind,
                by=by[:200], dag_run=dag_run[:250], reason=reason[:MAX_REASON_CHARS],
                evaluation={k: v[:MAX_EVIDENCE_CHARS] if isinstance(v, str) else v
                            for k, v in (evaluation or {}).items()},
                requested_at=now_iso(),
            )
            self._write(record)
            fault_point("history.before_alias")
        self.registry.client.set_registered_model_alias(self.registry.model_name, self.registry.alias,
                                                        str(target.version))
        fault_point("registry.after_alias")
        self.registry.client.set_model_version_tag(self.registry.model_name, str(target.version), PROMOTED_TAG,
                                                   datetime.now(UTC).isoformat(timespec="seconds"))
        done = ChampionMove.from_dict({**record.to_dict(), "at": now_iso(), "state": "done"})
        self._write(done)
        log.info("%s@%s moved from %s to v%d (%s)", self.registry.model_name, self.registry.alias,
                 f"v{done.from_version}" if done.from_version else "nothing", done.to_version, kind)
        return done
