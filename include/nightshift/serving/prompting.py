"""The prompt template the endpoint applies to chat requests, kept current from MLflow's Prompt Registry.

A watcher thread polls the served prompt's ``production`` alias (and its ``candidate`` under a canary) every
``poll_seconds``; a moved alias is applied from the next request on, without a restart. A request is answered
under the production version, or, in a canary, under the candidate when its sticky identity (the ``user``
field, else the API key) hashes below the candidate's share: the same routing as a model canary
(serving/canary.py), so one user sees one prompt for the whole step.

The prompt's messages (system prompt, few-shot examples) come before the caller's; the caller's own system
message stays, after them. Answers record the prompt version (``X-Nightshift-Prompt-Version``, the request log,
``nightshift trace``). ``/v1/completions`` reads raw text and applies no prompt. A registry that cannot be read,
or a version whose template fails its digest, keeps the version applied so far (and says so in the log).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from nightshift.registry.prompt_registry import CANDIDATE, PRODUCTION, PromptRegistry, PromptVersion
from nightshift.serving.canary import bucket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedPrompt:
    """The prompt version one request is answered under, and in which role (``production`` or ``candidate``)."""

    version: PromptVersion
    role: str

    @property
    def header(self) -> str:
        return self.version.label


def prompt_headers(applied: AppliedPrompt | None) -> dict[str, str]:
    """Return the response headers naming the prompt an answer was given under (none without one)."""
    if applied is None:
        return {}
    return {"X-Nightshift-Prompt-Version": applied.header, "X-Nightshift-Prompt-Role": applied.role}


def routes_to_prompt_candidate(share: float, version: int, identity: str) -> bool:
    """Return True when a prompt canary at ``share`` sends this identity to the candidate ``version``."""
    # Keyed apart from a model canary's buckets, so the two canaries split users independently.
    return share > 0 and bucket(f"prompt:{identity}", version) < share


class PromptWatcher:
    """Keeps the served prompt's production version, and a canary's candidate with its share."""

    def __init__(self, registry: PromptRegistry, name: str, poll_seconds: float = 5.0) -> None:
        self.registry = registry
        self.name = name
        self.poll_seconds = poll_seconds
        self.production: PromptVersion | None = None
        self.canary: tuple[PromptVersion, float] | None = None
        self.detail: str | None = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None
        self.ready = False
        """Whether the production alias was read once: until then chat requests wait (503), since a production
        prompt may exist that the endpoint has not seen."""

    def refresh(self) -> bool:
        """Read the aliases; return True when what is applied changed. A failure keeps what was applied: the
        production prompt and the canary are read apart, so a broken candidate never holds back a production move."""
        before = (_key(self.production), _key(self.canary[0]) if self.canary else None,
                  self.canary[1] if self.canary else None)
        problems = []
        try:
            production = self.registry.by_alias(self.name, PRODUCTION)
            if production is not None:
                self.registry.verified(production)
            self.production = production
            self.ready = True
        except Exception as exc:  # an unreadable store or an altered template: keep serving what we have
            problems.append(f"production: {type(exc).__name__}: {exc}"[:300])
        try:
            canary = self.registry.rollout(self.name)
            if canary is not None:
                self.registry.verified(canary[0])
            self.canary = canary
        except Exception as exc:  # a candidate that cannot be read or trusted gets no traffic
            problems.append(f"candidate: {type(exc).__name__}: {exc}"[:300])
            self.canary = None
        problem = "; ".join(problems) or None
        if problem and problem != self._failing:
            log.error("prompt %s: %s; applying %s", self.name, problem,
                      self.production.label if self.production else "no prompt")
        self._failing = problem
        production, canary = self.production, self.canary
        self.detail = problem or (None if production else
                                  f"no version of prompt {self.name} carries {PRODUCTION!r} yet")
        after = (_key(production), _key(canary[0]) if canary else None, canary[1] if canary else None)
        if before != after:
            log.info("prompt %s: applying %s%s", self.name, production.label if production else "no prompt",
                     f"; canary {canary[0].label} for {canary[1]:.0%}" if canary else "")
        return before != after

    def pick(self, identity: str) -> AppliedPrompt | None:
        """Return the prompt a request of ``identity`` is answered under, or None (no production prompt yet)."""
        canary, production = self.canary, self.production
        if canary is not None and routes_to_prompt_candidate(canary[1], canary[0].version, identity):
            return AppliedPrompt(canary[0], CANDIDATE)
        return AppliedPrompt(production, PRODUCTION) if production is not None else None

    def info(self) -> dict | None:
        """What /healthz says about the prompts applied."""
        return {"name": self.name, "production": self.production.version if self.production else None,
                "canary": ({"version": self.canary[0].version, "share": self.canary[1]} if self.canary else None),
                "detail": self.detail, "ready": self.ready}

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="prompt-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("prompt watcher error; still applying the previous prompt")


def _key(version: PromptVersion | None) -> tuple[int, str] | None:
    return (version.version, version.digest) if version else None
