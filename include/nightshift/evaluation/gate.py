"""The promotion gate: rules on the candidate-vs-champion intervals of include/configs/gate.yaml.

A rule tests the paired bootstrap interval of one metric's difference (candidate - champion; for
perplexities the relative change). The candidate is promoted only if every rule holds. A metric that is
missing, or whose value or interval is not finite, fails its rule: only a metric that was not measured at
all (no judge configured) may be skipped, and only where its rule says ``if_unmeasured: skip``. Judge
metrics scored on fewer than ``judge_min_coverage`` of their examples fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.evaluation.metrics import CATALOG
from nightshift.records import GateCheck, GateDecision, MetricComparison
from nightshift.settings import CONFIG_DIR

DEFAULT_POLICY = CONFIG_DIR / "gate.yaml"
BOUNDS = {
    "lower_bound_above": ("lower bound", ">"),
    "upper_bound_below": ("upper bound", "<"),
    "difference_at_least": ("difference", ">="),
    "difference_at_most": ("difference", "<="),
}


@dataclass(frozen=True)
class GateRule:
    metric: str
    test: str
    """One of BOUNDS: which number of the comparison is tested, and how."""
    threshold: float
    if_unmeasured: str = "fail"

    @property
    def condition(self) -> str:
        what, op = BOUNDS[self.test]
        return f"{what} {op} {self.threshold:+g}"

    def check(self, comparison: MetricComparison | None, min_coverage: float) -> GateCheck:
        if comparison is None:
            return GateCheck(self.metric, self.condition, "failed", "not in the evaluation suite")
        if not comparison.measured:
            outcome = "skipped" if self.if_unmeasured == "skip" else "failed"
            return GateCheck(self.metric, self.condition, outcome, f"not measured: {comparison.unmeasured}")
        if CATALOG[self.metric].judge and comparison.items:
            coverage = comparison.n / comparison.items
            if coverage < min_coverage:
                return GateCheck(self.metric, self.condition, "failed",
                                 f"the judge scored {comparison.n} of {comparison.items} pairs "
                                 f"(coverage {coverage:.2f} < {min_coverage:.2f})")
        if not comparison.finite:
            return GateCheck(self.metric, self.condition, "failed",
                             f"not finite: {comparison.describe().split(': ', 1)[1]}")
        value = {"lower_bound_above": comparison.low, "upper_bound_below": comparison.high,
                 "difference_at_least": comparison.difference, "difference_at_most": comparison.difference}[self.test]
        passed = {">": value > self.threshold, "<": value < self.threshold, ">=": value >= self.threshold,
                  "<=": value <= self.threshold}[BOUNDS[self.test][1]]
        detail = (f"{comparison.difference:+.4g} [{comparison.low:+.4g}, {comparison.high:+.4g}] over "
                  f"{comparison.n} examples (candidate {comparison.candidate:.4g}, champion {comparison.baseline:.4g})")
        return GateCheck(self.metric, self.condition, "passed" if passed else "failed", detail)


@dataclass(frozen=True)
class GatePolicy:
    rules: tuple[GateRule, ...]
    judge_min_coverage: float = 0.8

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> GatePolicy:
        path = Path(path)
        data = read_yaml_mapping(path)
        where = path.name
        unknown = sorted(str(k) for k in set(data) - {"rules", "judge_min_coverage"})
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        coverage = data.get("judge_min_coverage", 0.8)
        if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0 <= coverage <= 1:
            raise ValueError(f"{where}: judge_min_coverage must be a number from 0 to 1")
        raw = data.get("rules")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: rules must be a non-empty list")
        return cls(tuple(_rule(where, i, r) for i, r in enumerate(raw, start=1)), float(coverage))

    @property
    def metrics(self) -> set[str]:
        return {r.metric for r in self.rules}


def _rule(where: str, index: int, raw: Any) -> GateRule:
    name = f"{where}: rules[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping")
    unknown = sorted(str(k) for k in set(raw) - {"metric", "if_unmeasured", *BOUNDS})
    if unknown:
        raise ValueError(f"{name}: unknown fields {unknown}")
    metric = raw.get("metric")
    if metric not in CATALOG:
        raise ValueError(f"{name}: metric must be one of {sorted(CATALOG)}")
    tests = [k for k in BOUNDS if k in raw]
    if len(tests) != 1:
        raise ValueError(f"{name} ({metric}): give exactly one of {sorted(BOUNDS)}")
    threshold = raw[tests[0]]
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"{name} ({metric}): {tests[0]} must be a finite number")
    unmeasured = raw.get("if_unmeasured", "fail")
    if unmeasured not in ("fail", "skip"):
        raise ValueError(f"{name} ({metric}): if_unmeasured must be fail or skip")
    return GateRule(metric, tests[0], float(threshold), unmeasured)


def decide(comparisons: list[MetricComparison], baseline: str, policy: GatePolicy) -> GateDecision:
    """Return whether the candidate may replace the baseline, with one reason per rule."""
    by_metric = {c.metric: c for c in comparisons}
    checks = [rule.check(by_metric.get(rule.metric), policy.judge_min_coverage) for rule in policy.rules]
    return GateDecision(
        passed=all(c.passed for c in checks), baseline=baseline, checks=[c.to_dict() for c in checks],
        reasons=[c.describe() for c in checks],
    )
