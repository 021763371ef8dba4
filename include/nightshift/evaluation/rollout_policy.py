"""Judging a rollout step on live traffic: the rollout policy (include/configs/rollout.yaml) and its verdicts.

A step is judged once it has lasted ``step_minutes`` and each version answered at least ``min_answers``
requests in it. The candidate must not exceed the champion's error rate by more than
``max_error_rate_increase``, its 95th-percentile latency by more than ``max_latency_p95_ratio`` times, or
(when both versions have ``min_ratings`` ratings) its share of negative feedback by more than
``max_negative_feedback_increase``. A signal that cannot be computed for the candidate fails; one that has
too little data (ratings) is skipped and said so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.settings import CONFIG_DIR

DEFAULT_POLICY = CONFIG_DIR / "rollout.yaml"
MODES = ("off", "canary", "shadow")


@dataclass(frozen=True)
class RolloutPolicy:
    mode: str = "off"
    steps: tuple[float, ...] = (0.1, 0.5)
    step_minutes: float = 10.0
    max_step_minutes: float = 120.0
    min_answers: int = 30
    max_error_rate_increase: float = 0.02
    max_latency_p95_ratio: float = 1.5
    max_negative_feedback_increase: float = 0.10
    min_ratings: int = 5
    judge_sample: int = 20
    """Answers of each version per step the LLM judge scores (0: no judge); needs the judge connection."""
    max_judge_drop: float = 0.10
    """Mean judged correctness (0-1), champion minus candidate, at most this."""

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> RolloutPolicy:
        path = Path(path)
        data = read_yaml_mapping(path)
        where = path.name
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; expected {sorted(known)}")
        mode = data.get("mode", "off")
        if mode is False:  # YAML reads a bare `off` as false
            mode = "off"
        if mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {list(MODES)}, not {mode!r}")
        steps = data.get("steps", list(cls.steps))
        if not isinstance(steps, list) or not steps or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 1 for s in steps):
            raise ValueError(f"{where}: steps must be a non-empty list of traffic shares between 0 and 1 (exclusive: "
                             "each step compares the candidate with the champion on live traffic, so both need some; "
                             "after the last step passes the candidate gets everything)")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"{where}: steps must grow (each share larger than the one before)")
        numbers: dict[str, Any] = {}
        for name, low, high in (("step_minutes", 0.001, 10_080), ("max_step_minutes", 0.001, 10_080),
                                ("min_answers", 1, 10**7), ("max_error_rate_increase", 0, 1),
                                ("max_latency_p95_ratio", 1, 100), ("max_negative_feedback_increase", 0, 1),
                                ("min_ratings", 1, 10**7), ("judge_sample", 0, 10_000),
                                ("max_judge_drop", 0, 1)):
            value = data.get(name, getattr(cls, name))
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{where}: {name} must be a number from {low} to {high}")
            numbers[name] = int(value) if name in ("min_answers", "min_ratings", "judge_sample") else float(value)
        if numbers["max_step_minutes"] < numbers["step_minutes"]:
            raise ValueError(f"{where}: max_step_minutes must be at least step_minutes")
        return cls(mode=mode, steps=tuple(float(s) for s in steps), **numbers)

    @property
    def poke_seconds(self) -> float:
        """How often a step looks at the signals: a quarter of the step, between 1 s and 60 s."""
        return max(1.0, min(60.0, self.step_minutes * 60 / 4))


@dataclass
class StepVerdict:
    ready: bool
    """Enough time and answers to judge."""
    passed: bool
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "passed": self.passed, "reasons": self.reasons, "signals": self.signals}


def judge_step(candidate: dict[str, float], champion: dict[str, float], elapsed_minutes: float,
               policy: RolloutPolicy) -> StepVerdict:
    """Judge one step from each version's signals (answers, errors, p95_seconds, ratings, negative_share)."""
    signals = {"candidate": candidate, "champion": champion, "elapsed_minutes": round(elapsed_minutes, 2)}
    waiting = []
    if elapsed_minutes < policy.step_minutes:
        waiting.append(f"{elapsed_minutes:.1f} of {policy.step_minutes:g} minutes")
    for name, s in (("candidate", candidate), ("champion", champion)):
        if s.get("answers", 0) < policy.min_answers:
            waiting.append(f"{name} answered {int(s.get('answers', 0))} of {policy.min_answers} requests")
    if waiting:
        return StepVerdict(False, False, ["waiting: " + "; ".join(waiting)], signals)
    reasons, passed = [], True

    def rate(s):
        return s["errors"] / s["answers"] if s.get("answers") else math.nan

    c_err, p_err = rate(candidate), rate(champion)
    increase = c_err - p_err
    ok = math.isfinite(increase) and increase <= policy.max_error_rate_increase
    passed &= ok
    reasons.append(f"error rate {c_err:.3f} vs {p_err:.3f} (increase {increase:+.3f}, at most "
                   f"{policy.max_error_rate_increase:+.3f}): {'ok' if ok else 'FAILED'}")
    c_p95, p_p95 = candidate.get("p95_seconds", math.nan), champion.get("p95_seconds", math.nan)
    ratio = c_p95 / p_p95 if p_p95 and math.isfinite(p_p95) and p_p95 > 0 else math.nan
    ok = math.isfinite(ratio) and ratio <= policy.max_latency_p95_ratio
    passed &= ok
    reasons.append(f"p95 latency {c_p95:.3f}s vs {p_p95:.3f}s (x{ratio:.2f}, at most "
                   f"x{policy.max_latency_p95_ratio:g}): {'ok' if ok else 'FAILED'}")
    if candidate.get("ratings", 0) >= policy.min_ratings and champion.get("ratings", 0) >= policy.min_ratings:
        delta = candidate["negative_share"] - champion["negative_share"]
        ok = math.isfinite(delta) and delta <= policy.max_negative_feedback_increase
        passed &= ok
        reasons.append(f"negative feedback {candidate['negative_share']:.2f} vs {champion['negative_share']:.2f} "
                       f"(increase {delta:+.2f}, at most {policy.max_negative_feedback_increase:+.2f}): "
                       f"{'ok' if ok else 'FAILED'}")
    else:
        reasons.append(f"feedback skipped: {int(candidate.get('ratings', 0))} and {int(champion.get('ratings', 0))} "
                       f"ratings, {policy.min_ratings} needed on each")
    c_judged, p_judged = candidate.get("judged"), champion.get("judged")
    if c_judged is None or p_judged is None:
        reasons.append(f"judge skipped: {candidate.get('judge_note') or 'no judge configured'}")
    elif min(c_judged, p_judged) < max(1, policy.judge_sample // 2):
        passed = False  # a judge that is configured but cannot score is not a pass
        reasons.append(f"judge scored {int(c_judged)} and {int(p_judged)} answers, fewer than "
                       f"{max(1, policy.judge_sample // 2)} each: FAILED")
    else:
        drop = champion["judge_correctness"] - candidate["judge_correctness"]
        ok = math.isfinite(drop) and drop <= policy.max_judge_drop
        passed &= ok
        reasons.append(f"judged correctness {candidate['judge_correctness']:.2f} vs {champion['judge_correctness']:.2f}"
                       f" (drop {drop:+.2f}, at most {policy.max_judge_drop:+.2f}): {'ok' if ok else 'FAILED'}")
    return StepVerdict(True, passed, reasons, signals)
