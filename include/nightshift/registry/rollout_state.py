"""The rollout state, kept in the registry: the ``candidate`` alias and its share of traffic or shadow mode.

The endpoint reads it on every poll; ``rollout_model`` writes it. State lives on the candidate version as tags
(``nightshift.rollout.mode``, ``.share``, ``.state``, ``.started``) and the alias is moved last (write, then
publish), so an endpoint never sees a candidate without its share. Ending a rollout removes the alias first,
so traffic returns to the champion before anything else happens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nightshift.records import ModelVersionRecord
from nightshift.registry.common import names_nothing
from nightshift.registry.mlflow_registry import ModelRegistry

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
MODE_TAG = "nightshift.rollout.mode"
SHARE_TAG = "nightshift.rollout.share"
STATE_TAG = "nightshift.rollout.state"
STARTED_TAG = "nightshift.rollout.started"
MODES = ("canary", "shadow")


@dataclass(frozen=True)
class Rollout:
    """The candidate now exposed: in ``canary`` mode ``share`` of the traffic; in ``shadow`` mode none."""

    version: ModelVersionRecord
    mode: str
    share: float
    started: float

    def to_dict(self) -> dict:
        return {"version": self.version.version, "mode": self.mode, "share": self.share, "started": self.started}


class Rollouts:
    """Reads and moves the candidate alias of one registered model."""

    def __init__(self, registry: ModelRegistry, alias: str = CANDIDATE_ALIAS) -> None:
        self.registry = registry
        self.alias = alias

    def current(self) -> Rollout | None:
        """Return the rollout under way, or None (no candidate alias, or one on the champion itself).

        A registry that cannot be read raises: read as "no rollout", it would end or skip a live one.
        """
        from mlflow.exceptions import MlflowException

        client = self.registry.client
        try:
            mv = client.get_model_version_by_alias(self.registry.model_name, self.alias)
        except MlflowException as exc:
            if names_nothing(exc):
                return None
            raise
        record = self.registry._record(mv)
        champion = self.registry.champion()
        if champion is not None and champion.version == record.version:
            return None
        tags = mv.tags or {}
        mode = tags.get(MODE_TAG, "canary")
        try:
            share = min(1.0, max(0.0, float(tags.get(SHARE_TAG, "0"))))
        except ValueError:
            share = 0.0
        return Rollout(record, mode if mode in MODES else "canary", share if mode == "canary" else 0.0,
                       float(tags.get(STARTED_TAG, "0") or 0))

    def start(self, version: ModelVersionRecord, mode: str, share: float) -> Rollout:
        """Expose ``version`` as the candidate; a second call for the same version changes nothing else."""
        if mode not in MODES:
            raise ValueError(f"rollout mode must be one of {MODES}, not {mode!r}")
        tags = self.registry.version_tags(version.version)
        started = tags.get(STARTED_TAG) if tags.get(STATE_TAG) == "active" else None
        self.registry.set_version_tags(version.version, {
            MODE_TAG: mode, SHARE_TAG: f"{share:g}", STATE_TAG: "active", STARTED_TAG: started or f"{time.time():.3f}",
        })
        self.registry.client.set_registered_model_alias(self.registry.model_name, self.alias, str(version.version))
        log.info("%s is the candidate (%s%s)", version.label, mode, f", {share:.0%} of traffic" if mode == "canary"
                 else "")
        current = self.current()
        assert current is not None
        return current

    def set_share(self, version: ModelVersionRecord, share: float) -> None:
        self.registry.set_version_tags(version.version, {SHARE_TAG: f"{share:g}"})

    def end(self, version: ModelVersionRecord, outcome: str) -> None:
        """Remove the candidate alias (traffic back to the champion), then record ``outcome`` on the version."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.registry.client.get_model_version_by_alias(self.registry.model_name, self.alias)
        except MlflowException as exc:
            if not names_nothing(exc):
                raise  # the alias may still send traffic to the candidate: its outcome must not be recorded yet
            mv = None  # already gone: a retry
        if mv is not None and int(mv.version) == version.version:
            self.registry.client.delete_registered_model_alias(self.registry.model_name, self.alias)
        self.registry.set_version_tags(version.version, {STATE_TAG: outcome, SHARE_TAG: "0"})
