"""Run long-lived processes together, restart the ones that die, and stop every process they started.

``nightshift up`` runs Airflow (standalone: scheduler, API server, DAG processor, triggerer and the
LocalExecutor's workers) and the endpoint under one ``Supervisor``. Stopping is thorough: this process
becomes a child subreaper (Linux), so descendants that detach from their parents are re-parented to it
and are found and stopped too; each service gets SIGTERM to its process group, then every remaining
descendant gets SIGTERM and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux only); return whether it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class Service:
    """A command to keep running."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    restart: bool = True
    """Restart the command when it exits (with back-off), instead of stopping everything."""
    log: Path | None = None
    """File its output is appended to; None: this process's own output."""
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0


class Supervisor:
    """Start services, restart those that die, and stop all of them on request.

    A service that keeps dying is restarted with a doubling back-off (up to ``max_backoff_s``) and never
    takes the others down with it: a crash-looping endpoint leaves Airflow running.
    """

    def __init__(self, services: list[Service], grace_seconds: float = 20.0, max_backoff_s: float = 300.0,
                 restart_window_s: float = 600.0, handle_signals: bool = True,
                 spare: frozenset[int] = frozenset()) -> None:
        self.services = services
        self.handle_signals = handle_signals
        """Stop on SIGTERM, SIGINT and SIGHUP (only the main thread may install handlers)."""
        self.spare = spare
        """Processes (with their descendants) that stopping leaves alone: engines another owner stops."""
        self.grace_seconds = grace_seconds
        self.max_backoff_s = max_backoff_s
        self.restart_window_s = restart_window_s
        self.stopping = threading.Event()
        self.subreaper = become_subreaper()

    def _start(self, service: Service) -> None:
        # A session of its own: a terminal's Ctrl-C reaches only this process, which then stops the rest in order.
        out = None
        if service.log is not None:
            service.log.parent.mkdir(parents=True, exist_ok=True)
            out = service.log.open("ab")
        try:
            service.process = subprocess.Popen(service.argv, env=service.env, start_new_session=True, stdout=out,
                                               stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()
        log.info("started %s (pid %d)", service.name, service.process.pid)

    def request_stop(self, *_args) -> None:
        self.stopping.set()

    def run(self, poll_seconds: float = 1.0) -> int:
        """Run until asked to stop (SIGTERM, SIGINT, SIGHUP) or a non-restarting service exits; return the status."""
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self.request_stop)
        try:
            for service in self.services:
                self._start(service)
            while not self.stopping.wait(poll_seconds):
                self._reap_orphans()
                for service in self.services:
                    if service.process is None:
                        if time.monotonic() >= service.next_start:
                            self._start(service)
                        continue
                    code = service.process.poll()
                    if code is None:
                        continue
                    if not service.restart:
                        log.error("%s exited with status %s; stopping everything", service.name, code)
                        return code or 1
                    now = time.monotonic()
                    service.restarts = [t for t in service.restarts if now - t < self.restart_window_s] + [now]
                    delay = min(self.max_backoff_s, 2.0 ** (len(service.restarts) - 1))
                    log.warning("%s exited with status %s (%d times in %.0f min); restarting in %.0fs", service.name,
                                code, len(service.restarts), self.restart_window_s / 60, delay)
                    self._stop_group(service)
                    service.process = None
                    service.next_start = now + delay
            return 0
        finally:
            self.stop_all()

    def _spared(self) -> set[int]:
        import psutil

        spared = set()
        for pid in self.spare:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                continue
            spared |= {pid} | {p.pid for p in _descendants(proc)}
        return spared

    def _reap_orphans(self) -> None:
        """Collect exit statuses of re-parented descendants so they do not linger as zombies."""
        if not self.subreaper:
            return
        own = {s.process.pid for s in self.services if s.process is not None}
        import psutil

        for child in psutil.Process().children():
            if child.pid in own:
                continue
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass

    def _stop_group(self, service: Service, sig: int = signal.SIGTERM) -> None:
        if service.process is None:
            return
        try:
            os.killpg(service.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        """Stop every service and every process they started; SIGKILL what outlives the grace period."""
        import psutil

        me = psutil.Process()
        spared = self._spared()
        descendants = [p for p in _descendants(me) if p.pid not in spared]
        for service in reversed(self.services):
            self._stop_group(service)
        for proc in descendants:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while time.monotonic() < deadline:
            alive = [p for p in _descendants(me) if _alive(p) and p.pid not in spared]
            if not alive:
                break
            time.sleep(0.2)
        leftovers = [p for p in _descendants(me) if _alive(p) and p.pid not in spared]
        for proc in leftovers:
            log.warning("killing %s (pid %d), still running after %.0fs", _name(proc), proc.pid, self.grace_seconds)
            _signal(proc, signal.SIGKILL)
        for service in self.services:
            if service.process is not None:
                try:
                    service.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for proc in [p for p in _descendants(me) if p.pid not in spared]:  # reap re-parented grandchildren
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        log.info("stopped %d processes", len({p.pid for p in descendants} | {p.pid for p in leftovers}))


def _descendants(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _name(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline()[:3]) or proc.name()
    except psutil.Error:
        return "?"
