"""Watching: keep the version an alias names loaded, swap in a new one when the alias moves, never block serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nightshift.records import ModelVersionRecord
from nightshift.serving.limits import MIB
from nightshift.serving.loading import LoadedModel, load_model, process_rss
from nightshift.settings import ServingLimits

log = logging.getLogger(__name__)


class ChampionWatcher:
    """Keeps the champion loaded and swaps in a new one when the registry alias moves.

    Loading never blocks the server: it runs in the watcher's thread while the previous model (if any) keeps
    answering. A version that fails to load is reported once through ``on_alert``, retried with back-off,
    and leaves the previous model serving.
    """

    RETRY_FIRST_S = 60.0
    RETRY_MAX_S = 900.0

    role = "champion"

    def __init__(
        self, registry, cache_dir: Path, limits: ServingLimits, poll_seconds: float = 5.0,
        on_alert: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.donor: ChampionWatcher | None = None
        """Another watcher whose loaded model may be taken over (the candidate, when it is promoted)."""
        self.cache_dir = cache_dir
        self.limits = limits
        self.poll_seconds = poll_seconds
        self.on_alert = on_alert
        self.current: LoadedModel | None = None
        self.detail: str | None = "starting"
        self.loading: int | None = None
        self.failures: dict[int, tuple[str, float, float]] = {}
        """version -> (error, next attempt at, back-off)"""
        self._runtime_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        """``ready``, ``loading`` (first model), ``swapping`` (a new one loads), ``no_model`` or ``failed``."""
        if self.loading is not None:
            return "swapping" if self.current else "loading"
        if self.current is not None:
            return "ready"
        return "failed" if self.failures else ("loading" if self.detail == "starting" else "no_model")

    def resolve(self) -> ModelVersionRecord | None:
        """Return the version this watcher should serve."""
        return self.registry.champion()

    def refresh(self) -> bool:
        """Load the champion if the alias points somewhere new; return True when the served model changed."""
        try:
            record = self.resolve()
        except Exception as exc:  # the registry may be briefly unavailable; keep serving what we have
            self.detail = f"registry unavailable: {type(exc).__name__}"
            log.warning("registry unavailable, still serving %s: %s",
                        self.current.record.label if self.current else "nothing", exc)
            return False
        if record is None:
            return self.nothing_to_serve()
        if self.current and self.current.record.version == record.version:
            self.detail = None
            return False
        donor = self.donor.current if self.donor else None
        if donor is not None and donor.record.version == record.version:
            previous = self.current.record.label if self.current else "nothing"
            self.current = donor
            self.detail = None
            log.info("serving %s as %s (was %s), taken over from the %s without reloading", record.label,
                     self.role, previous, self.donor.role)
            return True
        failed = self.failures.get(record.version)
        if failed and time.monotonic() < failed[1]:
            return False
        return self._load(record, failed)

    def nothing_to_serve(self) -> bool:
        self.detail = f"no model carries the alias {self.registry.alias!r} yet"
        return False

    def _load(self, record: ModelVersionRecord, failed: tuple[str, float, float] | None) -> bool:
        import gc

        if self._runtime_bytes is None:
            self._runtime_bytes = process_rss()
        self.loading = record.version
        started = time.monotonic()
        try:
            folder = self.registry.download(record, self.cache_dir)
            loaded = load_model(record, folder, self.limits, self._runtime_bytes)
        except Exception as exc:
            backoff = min(self.RETRY_MAX_S, failed[2] * 2) if failed else self.RETRY_FIRST_S
            error = f"{type(exc).__name__}: {exc}"
            self.failures[record.version] = (error, time.monotonic() + backoff, backoff)
            serving = self.current.record.label if self.current else "nothing"
            self.detail = f"{record.label} failed to load ({error}); serving {serving}"
            log.error("could not load %s; still serving %s; next try in %.0fs", record.label, serving, backoff,
                      exc_info=True)
            if failed is None and self.on_alert:
                self._alert(record, error, serving)
            return False
        finally:
            self.loading = None
        previous = self.current.record.label if self.current else "nothing"
        self.current = loaded
        self.failures.pop(record.version, None)
        self.detail = None
        gc.collect()
        try:  # only the model being served needs its files on disk
            self.registry.prune_cache(self.cache_dir, keep=[record])
        except OSError:
            log.warning("could not prune %s", self.cache_dir, exc_info=True)
        log.info("serving %s as %s (was %s), loaded in %.1fs: window %d tokens, %d MiB of weights, %d MiB for "
                 "requests", record.label, self.role, previous, time.monotonic() - started, loaded.window,
                 loaded.model_bytes // MIB, loaded.capacity_bytes // MIB)
        return True

    def _alert(self, record: ModelVersionRecord, error: str, serving: str) -> None:
        try:
            self.on_alert(  # type: ignore[misc]
                f"endpoint could not load {record.label}",
                f"The {self.role} alias points at {record.label}, which failed to load: {error}. "
                f"The endpoint keeps serving {serving} as {self.role}.", "error",
            )
        except Exception:
            log.exception("could not send the alert about %s", record.label)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"{self.role}-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("champion watcher error; still serving the previous model")
            self._stop.wait(self.poll_seconds)
