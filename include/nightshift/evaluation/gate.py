"""The promotion gate: a YAML policy applied to a candidate and its baseline, evaluated in one harness."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from nightshift.configs import load_yaml_dataclass
from nightshift.records import EvaluationReport, GateCheck, GateDecision
from nightshift.settings import CONFIG_DIR

DEFAULT_POLICY = CONFIG_DIR / "gate.yaml"


@dataclass(frozen=True)
class GatePolicy:
    """How much worse than the baseline a candidate may be, per metric (lower metrics are better)."""

    max_perplexity_regression: float = 0.0
    """Allowed relative increase of held-out perplexity (0.02 = 2% worse still passes)."""
    max_golden_regression: float = 0.05
    """Allowed relative increase of golden-answer perplexity."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"gate policy: {f.name} must be a number >= 0, got {value!r}")

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> GatePolicy:
        return load_yaml_dataclass(cls, path)


def _check(metric: str, candidate: float, baseline: float, allowed: float) -> GateCheck:
    limit = baseline * (1 + allowed)
    passed = math.isfinite(candidate) and (not math.isfinite(baseline) or candidate <= limit)
    return GateCheck(metric=metric, candidate=candidate, baseline=baseline, limit=limit, passed=passed)


def decide(candidate: EvaluationReport, baseline: EvaluationReport, policy: GatePolicy) -> GateDecision:
    """Return whether the candidate may replace the baseline, with one reason per check."""
    checks = [
        _check("perplexity", candidate.perplexity, baseline.perplexity, policy.max_perplexity_regression),
        _check(
            "golden_perplexity", candidate.golden_perplexity, baseline.golden_perplexity,
            policy.max_golden_regression,
        ),
    ]
    return GateDecision(
        passed=all(c.passed for c in checks),
        baseline=baseline.model,
        checks=[c.to_dict() for c in checks],
        reasons=[c.describe() for c in checks],
    )
