"""Named fault points, for proving that every step survives being killed at the worst moment.

Code marks the moments that matter (``fault_point("versioning.after_commit")``). Normally a fault point does
nothing; when ``NIGHTSHIFT_FAULT`` names it, the process dies there with SIGKILL (as a worker does when its
node goes away: no ``finally``, no clean-up) or, with a ``:raise`` suffix, raises ``InjectedFault`` (as a
failed external call does). The fault-injection tests run each step so, retry it, and compare the end state
with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

ENV = "NIGHTSHIFT_FAULT"


class InjectedFault(RuntimeError):
    """A failure injected at a named fault point."""


def fault_point(name: str) -> None:
    """Die (or raise) here when ``NIGHTSHIFT_FAULT`` names this point; do nothing otherwise."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    for entry in wanted.split(","):
        point, _, mode = entry.strip().partition(":")
        if point == name:
            if mode == "raise":
                raise InjectedFault(f"fault injected at {name}")
            os.kill(os.getpid(), signal.SIGKILL)
