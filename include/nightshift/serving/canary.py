"""Canary and shadow rollouts in the endpoint: which version answers a request.

A second watcher keeps the registry's ``candidate`` (registry/rollout_state.py) loaded beside the champion. In
``canary`` mode a request goes to the candidate when its sticky identity (the request's ``user`` field, else
the API key) hashes below the candidate's share, so one user sees one version for the whole step and a larger
share only adds users. In ``shadow`` mode the champion answers every request; when a generation slot is free
the candidate answers the same prompt afterwards, and that answer only goes to the request log (role
``shadow``, id ``<response id>-shadow``). When the alias goes away the candidate is unloaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from nightshift.records import ModelVersionRecord
from nightshift.registry.rollout_state import Rollout, Rollouts
from nightshift.serving.loading import LoadedModel
from nightshift.serving.watching import ChampionWatcher
from nightshift.settings import ServingLimits

log = logging.getLogger(__name__)

BUCKETS = 10_000


def bucket(identity: str, version: int) -> float:
    """Return a stable number in [0, 1) for this identity and candidate version."""
    digest = hashlib.sha256(f"{version}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS / BUCKETS


def routes_to_candidate(rollout: Rollout | None, identity: str) -> bool:
    """Return True when a canary rollout sends this identity to the candidate."""
    if rollout is None or rollout.mode != "canary" or rollout.share <= 0:
        return False
    return bucket(identity, rollout.version.version) < rollout.share


class CandidateWatcher(ChampionWatcher):
    """Keeps the candidate of a rollout loaded, with its mode and share; unloads it when the rollout ends."""

    role = "candidate"

    def __init__(self, registry, cache_dir: Path, limits: ServingLimits, poll_seconds: float = 5.0,
                 on_alert=None) -> None:
        super().__init__(registry, cache_dir, limits, poll_seconds, on_alert)
        self.rollouts = Rollouts(registry)
        self.rollout: Rollout | None = None
        self.taker: ChampionWatcher | None = None
        """The champion watcher, which takes this model over when it is promoted."""

    def resolve(self) -> ModelVersionRecord | None:
        rollout = self.rollouts.current()
        if rollout is not None and self.current is not None and self.current.record.version == rollout.version.version:
            self.rollout = rollout  # share and mode may change at every step
        elif rollout is None:
            self.rollout = None
        self._pending = rollout
        return rollout.version if rollout else None

    def refresh(self) -> bool:
        changed = super().refresh()
        pending = getattr(self, "_pending", None)
        if changed and pending is not None and self.current is not None \
                and self.current.record.version == pending.version.version:
            self.rollout = pending
        return changed

    def nothing_to_serve(self) -> bool:
        self.detail = None
        if self.current is None:
            return False
        taker = self.taker
        if taker is not None and taker.current is not self.current:
            champion = self.registry.champion()
            if champion is not None and champion.version == self.current.record.version:
                return False  # promoted: kept until the champion watcher has taken it over
        log.info("the rollout of %s ended: candidate unloaded", self.current.record.label)
        self.current = None
        self.rollout = None
        import gc

        gc.collect()
        return True

    @property
    def state(self) -> str:
        if self.loading is not None:
            return "loading"
        return "ready" if self.current is not None else "none"

    def active(self) -> tuple[Rollout, LoadedModel] | None:
        """Return the rollout whose candidate is loaded and ready to answer, with that model; or None."""
        rollout, loaded = self.rollout, self.current
        if rollout is None or loaded is None or loaded.record.version != rollout.version.version:
            return None
        return rollout, loaded
