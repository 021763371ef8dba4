"""Named fault points, for proving that every step survives being killed at the worst moment.

Code marks the moments that matter (``fault_point("versioning.after_commit")``). Normally a fault point does
nothing; when ``NIGHTSHIFT_FAULT`` names it, the process dies there with SIGKILL (as a worker does when its
node goes away: no ``finally``, no clean-up), or with a ``:raise`` suffix raises ``InjectedFault`` (as a
failed external call does), or with ``:once`` raises only the first time (a marker file in
``NIGHTSHIFT_FAULT_DIR`` remembers it), so that Airflow's retry of the task meets no fault; ``:kill-once``
dies with SIGKILL the first time only (a training rank that dies, then a retry that resumes); ``:corrupt``
raises ``InjectedCorruption``, a ``ValueError`` (as a truncated response or file does), which a task must
retry like any failed call rather than take for a bad request. The fault-injection tests run each step so,
retry it, and compare the end state with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "NIGHTSHIFT_FAULT"
ONCE_DIR_ENV = "NIGHTSHIFT_FAULT_DIR"


class InjectedFault(RuntimeError):
    """A failure injected at a named fault point."""


class InjectedCorruption(ValueError):
    """Unreadable data injected at a named fault point (a ValueError, as JSON or a manifest that was cut short)."""


def fault_point(name: str) -> None:
    """Die (or raise) here when ``NIGHTSHIFT_FAULT`` names this point; do nothing otherwise."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    for entry in wanted.split(","):
        point, _, mode = entry.strip().partition(":")
        if point != name:
            continue
        if mode in ("once", "kill-once"):
            marker = Path(os.environ.get(ONCE_DIR_ENV, ".")) / f"fault-{name}"
            if marker.exists():
                continue
            marker.touch()
            if mode == "kill-once":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"fault injected at {name} (once)")
        if mode == "raise":
            raise InjectedFault(f"fault injected at {name}")
        if mode == "corrupt":
            raise InjectedCorruption(f"unreadable data injected at {name}")
        os.kill(os.getpid(), signal.SIGKILL)
