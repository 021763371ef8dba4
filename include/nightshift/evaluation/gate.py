"""The promotion gate: rules on the candidate-vs-champion intervals of include/configs/gate.yaml.

A rule says how much better the candidate must be (``min_gain``) or how much worse it may be (``max_loss``)
on one metric. Better and worse follow the metric's direction in the catalog (metrics.py), so a rule reads
the same for a score and for a perplexity and cannot silently invert: the gain is candidate - champion for a
metric where higher is better, champion - candidate where lower is better (for perplexities and bits per
byte, the relative change). ``basis: interval`` (the default) tests the paired bootstrap interval's worse
end, i.e. holds with the suite's confidence; ``basis: estimate`` tests the point difference alone.

The candidate is promoted only if every rule holds. A metric that is missing, or whose value or interval
is not finite, fails its rule: only a metric that was not measured at all (no judge configured, models with
different tokenizers for a per-token metric) may be skipped, and only where its rule says
``if_unmeasured: skip``. Judge metrics scored on fewer than ``judge_min_coverage`` of their examples fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.evaluation.approval import FIELDS as APPROVAL_FIELDS
from nightshift.evaluation.approval import ReleaseApproval
from nightshift.evaluation.metrics import CATALOG, MetricSpec
from nightshift.records import GateCheck, GateDecision, MetricComparison
from nightshift.settings import CONFIG_DIR

DEFAULT_POLICY = CONFIG_DIR / "gate.yaml"
TESTS = ("max_loss", "min_gain")
BASES = ("interval", "estimate")
OLD_TESTS = ("lower_bound_above", "upper_bound_below", "difference_at_least", "difference_at_most")
"""Keys of the earlier policy format, in candidate - champion terms whatever the direction: refused with
their rewrite, since the same key meant "better" for one metric and "worse" for another."""


@dataclass(frozen=True)
class GateRule:
    metric: str
    test: str
    """``max_loss`` (worse by at most the threshold) or ``min_gain`` (better by at least the threshold)."""
    threshold: float
    basis: str = "interval"
    """``interval``: the interval's worse end; ``estimate``: the point difference."""
    if_unmeasured: str = "fail"

    @property
    def condition(self) -> str:
        """The rule in words, e.g. ``worse by at most 2% (worse end of the interval)``."""
        amount = _amount(CATALOG[self.metric], self.threshold)
        words = f"worse by at most {amount}" if self.test == "max_loss" else f"better by at least {amount}"
        if self.threshold == 0:
            words = "no worse"
        return f"{words} (worse end of the interval)" if self.basis == "interval" else f"{words} (point estimate)"

    def gain(self, comparison: MetricComparison) -> float:
        """Return the gain the rule tests: positive when the candidate is better, at its basis."""
        higher = CATALOG[self.metric].higher_is_better
        if self.basis == "estimate":
            return comparison.difference if higher else -comparison.difference
        return comparison.low if higher else -comparison.high

    def check(self, comparison: MetricComparison | None, min_coverage: float) -> GateCheck:
        """Return whether the comparison satisfies the rule, and the numbers that decided it."""
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
        gain = self.gain(comparison) + 0.0  # + 0.0: a tie reads "better by 0", not "-0"
        passed = -gain <= self.threshold if self.test == "max_loss" else gain >= self.threshold
        spec = CATALOG[self.metric]
        where = "at the worse end of the interval" if self.basis == "interval" else "estimated"
        verdict = f"better by {_amount(spec, gain)}" if gain >= 0 else f"worse by {_amount(spec, -gain)}"
        detail = (f"{verdict} {where}; {comparison.difference:+.4g} [{comparison.low:+.4g}, {comparison.high:+.4g}]"
                  f" over {comparison.n} examples (candidate {comparison.candidate:.4g}, champion "
                  f"{comparison.baseline:.4g}; {spec.direction} is better)")
        return GateCheck(self.metric, self.condition, "passed" if passed else "failed", detail)


def _amount(spec: MetricSpec, value: float) -> str:
    """Return a gain or loss as the metric counts it: a percentage for relative changes."""
    return f"{value * 100:.4g}%" if spec.relative else f"{value:.4g}"


@dataclass(frozen=True)
class GatePolicy:
    rules: tuple[GateRule, ...]
    judge_min_coverage: float = 0.8
    approval: ReleaseApproval = ReleaseApproval()
    """Whether a candidate that passed waits for a person (evaluation/approval.py)."""

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> GatePolicy:
        path = Path(path)
        data = read_yaml_mapping(path)
        where = path.name
        unknown = sorted(str(k) for k in set(data) - {"rules", "judge_min_coverage", *APPROVAL_FIELDS})
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        coverage = data.get("judge_min_coverage", 0.8)
        if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0 <= coverage <= 1:
            raise ValueError(f"{where}: judge_min_coverage must be a number from 0 to 1")
        raw = data.get("rules")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: rules must be a non-empty list")
        return cls(tuple(_rule(where, i, r) for i, r in enumerate(raw, start=1)), float(coverage),
                   ReleaseApproval.parse(data, where))

    @property
    def metrics(self) -> set[str]:
        return {r.metric for r in self.rules}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(where: str, index: int, raw: Any) -> GateRule:
    name = f"{where}: rules[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping")
    metric = raw.get("metric")
    if metric not in CATALOG:
        raise ValueError(f"{name}: metric must be one of {sorted(CATALOG)}")
    name = f"{name} ({metric})"
    old = [k for k in OLD_TESTS if k in raw]
    if old:
        raise ValueError(_rewrite(name, CATALOG[metric], old[0], raw[old[0]]))
    unknown = sorted(str(k) for k in set(raw) - {"metric", "if_unmeasured", "basis", *TESTS})
    if unknown:
        raise ValueError(f"{name}: unknown fields {unknown}")
    tests = [k for k in TESTS if k in raw]
    if len(tests) != 1:
        raise ValueError(f"{name}: give exactly one of max_loss (how much worse it may be) or min_gain (how much "
                         "better it must be)")
    test = tests[0]
    threshold = raw[test]
    if not _number(threshold):
        raise ValueError(f"{name}: {test} must be a finite number")
    if threshold < 0:
        other = "min_gain" if test == "max_loss" else "max_loss"
        raise ValueError(f"{name}: {test} must be 0 or more; write {other}: {-threshold:g} instead")
    basis = raw.get("basis", "interval")
    if basis not in BASES:
        raise ValueError(f"{name}: basis must be interval (the interval's worse end) or estimate (the point "
                         "difference)")
    unmeasured = raw.get("if_unmeasured", "fail")
    if unmeasured not in ("fail", "skip"):
        raise ValueError(f"{name}: if_unmeasured must be fail or skip")
    return GateRule(metric, test, float(threshold), basis, unmeasured)


def _rewrite(name: str, spec: MetricSpec, key: str, value: Any) -> str:
    """Return the error for a rule in the earlier candidate - champion format, with the rule to write instead."""
    if not _number(value):
        return f"{name}: {key} is no longer read; write max_loss or min_gain (see the comments in gate.yaml)"
    basis = "interval" if key.startswith(("lower", "upper")) else "estimate"
    # The key tests the better side when it points along the direction (a lower bound where lower is better).
    inverted = (key in ("lower_bound_above", "difference_at_least")) != spec.higher_is_better
    # The gain bound: exact for a well-directed key; for an inverted one, the bound its author most likely
    # meant, with the sign turned to the metric's direction.
    gain = (value if spec.higher_is_better != inverted else -value) + 0.0  # + 0.0: no "-0"
    rule = GateRule(spec.name, "min_gain" if gain >= 0 else "max_loss", abs(gain), basis)
    written = f"{rule.test}: {rule.threshold:g}" + (", basis: estimate" if basis == "estimate" else "")
    if inverted:
        return (f"{name}: {spec.direction} is better, so {key}: {value:g} would pass a candidate that got worse "
                f"and fail one that got better; write {written}, which reads \"{rule.condition}\"")
    return (f"{name}: {key} is no longer read; rules say how much worse (max_loss) or better (min_gain) the "
            f"candidate may be, in the metric's direction ({spec.direction} is better): write {written}, which "
            f"reads \"{rule.condition}\"")


def decide(comparisons: list[MetricComparison], baseline: str, policy: GatePolicy,
           not_applicable: dict[str, str] | None = None) -> GateDecision:
    """Return whether the candidate may replace the baseline, with one reason per rule.

    ``not_applicable``: metrics the change cannot move, with why (a prompt release: the held-out text reads the
    same under any prompt); their rules are skipped and say so.
    """
    by_metric = {c.metric: c for c in comparisons}
    skip = not_applicable or {}
    checks = [GateCheck(rule.metric, rule.condition, "skipped", f"not applicable: {skip[rule.metric]}")
              if rule.metric in skip else rule.check(by_metric.get(rule.metric), policy.judge_min_coverage)
              for rule in policy.rules]
    return GateDecision(
        passed=all(c.passed for c in checks), baseline=baseline, checks=[c.to_dict() for c in checks],
        reasons=[c.describe() for c in checks],
    )
