"""The GPU engine path: generation by an OpenAI-compatible engine (vLLM) behind nightshift's front.

In production vLLM runs on GPU nodes (``serving/deploy.py`` renders its Deployment, which loads the
registry's champion at start) and ``nightshift serve`` with ``NIGHTSHIFT_SERVE_ENGINE=upstream`` stays in
front of it: API keys, limits, rollouts, the request log, feedback and metrics are nightshift's; tokens
come from vLLM. The front never claims a version the engine does not serve: a watcher asks each engine
which model it serves (vLLM's ``--served-model-name nightshift-llm-v<N>``, or a ``version`` field) and
routes to it only when that is the version the registry alias names; until the engine has restarted on a
newly promoted version, the previous one keeps answering, and says so.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from nightshift.records import ModelVersionRecord
from nightshift.serving.canary import CandidateWatcher
from nightshift.serving.watching import ChampionWatcher

log = logging.getLogger(__name__)

_VERSION = re.compile(r"-v(\d+)$")


@dataclass
class UpstreamModel:
    """A model version served by an engine at ``base_url`` under ``served_name``."""

    record: ModelVersionRecord
    base_url: str
    served_name: str
    window: int | None = None
    loaded_at: float = field(default_factory=time.time)


def served_version(entry: dict[str, Any]) -> int | None:
    """Return the model version an engine's ``/v1/models`` entry serves (``...-v<N>`` or a ``version`` field)."""
    if isinstance(entry.get("version"), int):
        return entry["version"]
    match = _VERSION.search(str(entry.get("id", "")))
    return int(match.group(1)) if match else None


def discover(base_url: str, timeout: float = 5.0) -> list[tuple[int, str, int | None]]:
    """Return (version, served name, context window) for each model the engine at ``base_url`` serves."""
    import httpx

    response = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout)
    response.raise_for_status()
    out = []
    for entry in response.json().get("data", []):
        version = served_version(entry)
        if version is not None:
            out.append((version, str(entry["id"]), entry.get("max_model_len")))
    return out


class _Upstream:
    """Watcher behaviour for an engine: 'loading' a version means finding the engine serving it."""

    base_url: str

    def _load(self, record: ModelVersionRecord, failed) -> bool:  # type: ignore[override]
        try:
            served = discover(self.base_url)
        except Exception as exc:
            self.detail = f"engine at {self.base_url} unreachable ({type(exc).__name__})"
            log.warning("%s engine unreachable at %s: %s", self.role, self.base_url, type(exc).__name__)
            return False
        match = [(v, name, window) for v, name, window in served if v == record.version]
        if not match:
            serving = ", ".join(name for _, name, _ in served) or "nothing"
            keep = self.current.record.label if self.current else "nothing"
            self.detail = (f"the {self.role} alias names {record.label}; the engine serves {serving}; "
                           f"answering with {keep} until the engine serves it")
            if getattr(self, "_told", None) != record.version:
                log.warning("%s", self.detail)
                self._told = record.version
            return False
        _, name, window = match[0]
        previous = self.current.record.label if self.current else "nothing"
        self.current = UpstreamModel(record, self.base_url.rstrip("/"), name, window)  # type: ignore[assignment]
        self.detail = None
        log.info("serving %s as %s through the engine at %s (was %s)", record.label, self.role, self.base_url,
                 previous)
        return True

    def refresh(self) -> bool:
        changed = super().refresh()  # type: ignore[misc]
        current = self.current
        if not changed and current is not None:
            try:  # the engine may have restarted on another version: never claim one it does not serve
                if all(v != current.record.version for v, _, _ in discover(self.base_url)):
                    log.warning("the engine at %s no longer serves %s", self.base_url, current.record.label)
                    self.current = None
                    return True
            except Exception:
                pass  # unreachable: requests get a 502 that says so
        return changed


class UpstreamChampionWatcher(_Upstream, ChampionWatcher):
    def __init__(self, base_url: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_url = base_url
        self.donor = None


class UpstreamCandidateWatcher(_Upstream, CandidateWatcher):
    def __init__(self, base_url: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_url = base_url
