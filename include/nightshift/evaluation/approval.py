"""Human approval of releases: the ``approval`` fields of include/configs/gate.yaml.

``approval: required`` makes a candidate that passed the gate wait for a person in the Airflow UI (finetune_model's
``approve_release``) before it is promoted or rolled out; ``approval_timeout_hours`` later, an unanswered request
is rejected. ``approval: none`` (the default) releases a candidate that passed at once.

Read apart from the gate's rules (evaluation/gate.py checks the same fields) because finetune_model reads the
timeout when its file is parsed: this module imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping

FIELDS = ("approval", "approval_timeout_hours")
MODES = ("none", "required")
MAX_TIMEOUT_HOURS = 24 * 30


@dataclass(frozen=True)
class ReleaseApproval:
    required: bool = False
    """A candidate that passed the gate waits for a person's Approve."""
    timeout_hours: float = 24.0
    """Unanswered after this long: rejected (the champion stays)."""

    @classmethod
    def parse(cls, data: dict[str, Any], where: str) -> ReleaseApproval:
        mode = data.get("approval", "none")
        if mode not in MODES:
            raise ValueError(f"{where}: approval must be none (release a candidate that passed at once) or required "
                             f"(a person approves it in the Airflow UI), got {mode!r}")
        hours = data.get("approval_timeout_hours", 24)
        if (not isinstance(hours, int | float) or isinstance(hours, bool) or not math.isfinite(hours)
                or not 0 < hours <= MAX_TIMEOUT_HOURS):
            raise ValueError(f"{where}: approval_timeout_hours must be a number of hours above 0 and at most "
                             f"{MAX_TIMEOUT_HOURS}, got {hours!r}")
        return cls(required=mode == "required", timeout_hours=float(hours))

    @classmethod
    def load(cls, path: Path) -> ReleaseApproval:
        return cls.parse(read_yaml_mapping(Path(path)), Path(path).name)
