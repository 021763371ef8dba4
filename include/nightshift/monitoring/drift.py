"""Drift between two dataset versions' profiles, judged by the policy in include/configs/drift.yaml.

Scores come from whylogs' drift algorithms (``calculate_drift_scores`` with a drift map built from the
policy). Hellinger distance is the default for every column: it is an effect size between 0 and 1 that does
not shrink with the number of documents, whereas the KS and chi-square p-values whylogs picks by default
call any difference "drift" on a 100,000-document corpus. whylogs has Hellinger for numeric columns only;
``CategoricalHellinger`` adds it for categorical ones from the profiles' frequent-item sketches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.monitoring.profiles import import_whylogs
from nightshift.settings import CONFIG_DIR

log = logging.getLogger(__name__)

DEFAULT_POLICY = CONFIG_DIR / "drift.yaml"
ALGORITHMS = ("hellinger", "ks", "chi_square")
REFERENCES = ("previous", "champion")
STATUS_ORDER = ("not_compared", "no_drift", "possible_drift", "drift")


@dataclass(frozen=True)
class MetricRule:
    """How one column is compared and when it counts as drift."""

    algorithm: str = "hellinger"
    """hellinger (a distance in [0, 1]; any column), ks (numeric) or chi_square (categorical): p-values."""
    possible_drift: float = 0.15
    """Hellinger: distance from which a change is reported as possible drift. ks/chi_square: p-value below which."""
    drift: float = 0.4
    """Hellinger: distance from which a change is drift. ks/chi_square: p-value below which."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if not (0.0 <= self.possible_drift <= 1.0 and 0.0 <= self.drift <= 1.0):
            raise ValueError("possible_drift and drift must lie in [0, 1]")
        distance = self.algorithm == "hellinger"
        if distance and not self.possible_drift <= self.drift:
            raise ValueError(f"a Hellinger distance needs possible_drift <= drift, got {self.possible_drift} > "
                             f"{self.drift}")
        if not distance and not self.drift <= self.possible_drift:
            raise ValueError(f"a p-value rule needs drift <= possible_drift (smaller p = stronger evidence), got "
                             f"{self.drift} > {self.possible_drift}")

    def thresholds(self):
        from whylogs.viz.drift.configs import DriftThresholds

        if self.algorithm == "hellinger":
            return DriftThresholds(NO_DRIFT=(0, self.possible_drift),
                                   POSSIBLE_DRIFT=(self.possible_drift, self.drift), DRIFT=(self.drift, 1.0000001))
        return DriftThresholds(NO_DRIFT=(self.possible_drift, 1.0000001),
                               POSSIBLE_DRIFT=(self.drift, self.possible_drift), DRIFT=(0, self.drift))


@dataclass(frozen=True)
class DriftPolicy:
    """When a new dataset version has drifted from a reference, and what happens then (drift.yaml)."""

    references: tuple[str, ...] = REFERENCES
    """What a new version is compared with: the previous version, the champion model's training version."""
    min_documents: int = 30
    """Below this many documents in either profile, drift is not judged (too few to say)."""
    alert_on: str = "drift"
    """Status that sends a warning alert: drift, possible_drift, or never."""
    block: bool = False
    """True: drift fails the run (alerted) and makes no dataset version; false: it only warns."""
    metrics: dict[str, MetricRule] = field(default_factory=dict)
    """Rule per profile column; columns not named are not judged."""
    token_sample: int = 5000
    """Documents whose tokens the profile counts with the base model's tokenizer (0: none)."""

    def __post_init__(self) -> None:
        unknown = [r for r in self.references if r not in REFERENCES]
        if unknown:
            raise ValueError(f"references: unknown {unknown}; use {', '.join(REFERENCES)}")
        if self.min_documents < 2:
            raise ValueError(f"min_documents must be at least 2, got {self.min_documents}")
        if self.alert_on not in ("drift", "possible_drift", "never"):
            raise ValueError(f"alert_on must be drift, possible_drift or never, got {self.alert_on!r}")
        if not self.metrics:
            raise ValueError("metrics: name at least one profile column to judge")
        if self.token_sample < 0:
            raise ValueError(f"token_sample must be >= 0, got {self.token_sample}")

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> DriftPolicy:
        """Read and validate a drift policy; errors name the file and the field."""
        path = Path(path)
        data = read_yaml_mapping(path)
        known = {"references", "min_documents", "alert_on", "block", "metrics", "token_sample"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path.name}: unknown settings {unknown}; known: {sorted(known)}")
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError(f"{path.name}: metrics must map column names to rules")
        rules = {}
        for name, rule in metrics.items():
            rule = rule or {}
            if not isinstance(rule, dict):
                raise ValueError(f"{path.name}: metrics.{name} must be a mapping (algorithm, possible_drift, drift)")
            bad = sorted(set(rule) - {"algorithm", "possible_drift", "drift"})
            if bad:
                raise ValueError(f"{path.name}: metrics.{name}: unknown settings {bad}")
            try:
                rules[str(name)] = MetricRule(**rule)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path.name}: metrics.{name}: {exc}") from None
        try:
            return cls(references=tuple(data.get("references", REFERENCES)),
                       min_documents=_int(data.get("min_documents", 30), "min_documents"),
                       alert_on=str(data.get("alert_on", "drift")),
                       block=_bool(data.get("block", False), path.name), metrics=rules,
                       token_sample=_int(data.get("token_sample", 5000), "token_sample"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path.name}: {exc}") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: block must be true or false")
    return value


@dataclass(frozen=True)
class DriftComparison:
    """A new version's profile against one reference."""

    reference: str
    """previous or champion."""
    reference_tag: str
    status: str
    """not_compared, no_drift, possible_drift or drift (the worst column)."""
    reason: str = ""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per column: algorithm, statistic, p_value, category, and what the chart needs."""

    @property
    def drifted(self) -> list[str]:
        return sorted(n for n, m in self.metrics.items() if m["category"] == "drift")

    @property
    def possibly_drifted(self) -> list[str]:
        return sorted(n for n, m in self.metrics.items() if m["category"] == "possible_drift")

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_tag": self.reference_tag, "status": self.status,
                "reason": self.reason, "drifted": self.drifted, "possibly_drifted": self.possibly_drifted,
                "metrics": self.metrics}


def not_compared(reference: str, tag: str, reason: str) -> DriftComparison:
    return DriftComparison(reference=reference, reference_tag=tag, status="not_compared", reason=reason)


def worst(statuses: list[str]) -> str:
    """Return the most severe of some statuses (not_compared when there are none)."""
    return max(statuses, key=STATUS_ORDER.index, default="not_compared")


def compare(target: Any, reference: Any, policy: DriftPolicy, reference_name: str, reference_tag: str,
            bins: int = 20) -> DriftComparison:
    """Return the drift of profile ``target`` from profile ``reference`` under a policy."""
    import_whylogs()
    from whylogs.viz.drift.column_drift_algorithms import calculate_drift_scores

    sizes = [_documents(target), _documents(reference)]
    if min(sizes) < policy.min_documents:
        return not_compared(reference_name, reference_tag, f"{min(sizes)} documents in a profile; drift.yaml's "
                            f"min_documents is {policy.min_documents}")
    target_cols, reference_cols = target.get_columns(), reference.get_columns()
    rules = {n: r for n, r in policy.metrics.items() if n in target_cols and n in reference_cols}
    drift_map = {name: _algorithm(rule) for name, rule in rules.items()}
    scores = calculate_drift_scores(target_view=target, reference_view=reference, drift_map=drift_map,
                                    with_thresholds=True) if drift_map else {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, rule in sorted(rules.items()):
        score = scores.get(name)
        if not score:
            continue  # the column has no values to compare (e.g. no token counts in an old profile)
        metrics[name] = {
            "algorithm": rule.algorithm,
            "statistic": _finite(score.get("statistic")),
            "p_value": _finite(score.get("pvalue")),
            "category": str(score.get("drift_category", "NO_DRIFT")).lower(),
            "possible_drift": rule.possible_drift, "drift": rule.drift,
            "shape": _shape(target_cols[name], reference_cols[name], bins),
        }
    if not metrics:
        return not_compared(reference_name, reference_tag, "no column of the policy is in both profiles")
    return DriftComparison(reference=reference_name, reference_tag=reference_tag,
                           status=worst([m["category"] for m in metrics.values()]), metrics=metrics)


def _documents(view: Any) -> int:
    return max((int(c.get_metric("counts").n.value) for c in view.get_columns().values()
                if c.get_metric("counts") is not None), default=0)


def _finite(value: Any) -> float | None:
    import math

    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _algorithm(rule: MetricRule):
    from whylogs.viz.drift.column_drift_algorithms import KS, ChiSquare
    from whylogs.viz.drift.configs import ChiSquareConfig, KSTestConfig

    if rule.algorithm == "ks":
        return KS(KSTestConfig(thresholds=rule.thresholds()))
    if rule.algorithm == "chi_square":
        return ChiSquare(ChiSquareConfig(thresholds=rule.thresholds()))
    return _hellinger_class()(rule)


_HELLINGER = None


def _hellinger_class():
    """Return the Hellinger algorithm for numeric (whylogs' own) and categorical columns (frequent items)."""
    global _HELLINGER
    if _HELLINGER is not None:
        return _HELLINGER
    import numpy as np
    from whylogs.viz.drift.column_drift_algorithms import ColumnDriftAlgorithm, DriftAlgorithmScore, Hellinger
    from whylogs.viz.drift.configs import HellingerConfig

    class AnyHellinger(ColumnDriftAlgorithm):
        """whylogs' Hellinger distance on the KLL sketch of numeric columns; on the category shares otherwise."""

        def __init__(self, rule: MetricRule) -> None:
            self.name = "hellinger"
            self.rule = rule
            # ~50 documents per histogram bin (whylogs' default is 4): with fewer, two samples of one
            # distribution differ by 0.15-0.35 at 50-200 documents from sampling noise alone; with 50, by < 0.1.
            super().__init__(HellingerConfig(thresholds=rule.thresholds(), hist_avg_number_per_bucket=50))

        def calculate(self, target_column_view, reference_column_view, with_thresholds=False):
            dist = target_column_view.get_metric("distribution")
            if dist is not None and not dist.kll.value.is_empty():
                return Hellinger(self._parameter_config).calculate(target_column_view, reference_column_view,
                                                                    with_thresholds)
            target, reference = _shares(target_column_view), _shares(reference_column_view)
            if not target or not reference:
                return None
            keys = sorted(set(target) | set(reference))
            p = np.array([target.get(k, 0.0) for k in keys])
            q = np.array([reference.get(k, 0.0) for k in keys])
            distance = float(np.sqrt(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)) / np.sqrt(2))
            if not with_thresholds:
                return DriftAlgorithmScore(algorithm=self.name, statistic=distance)
            return DriftAlgorithmScore(algorithm=self.name, statistic=distance,
                                       thresholds=self._parameter_config.thresholds,
                                       drift_category=self._get_drift_category(distance))

        def set_parameters(self, parameter_config) -> None:
            self._parameter_config = parameter_config

    _HELLINGER = AnyHellinger
    return AnyHellinger


def _shares(column: Any) -> dict[str, float]:
    """Return each frequent value's share of a column's non-null values."""
    items = column.get_metric("frequent_items")
    if items is None:
        return {}
    top = items.to_summary_dict().get("frequent_strings") or []
    total = sum(int(i.est) for i in top)
    return {str(i.value): int(i.est) / total for i in top} if total else {}


def _shape(target: Any, reference: Any, bins: int) -> dict[str, Any]:
    """Return what a chart of the two distributions needs: shared histogram bins, or category shares."""
    dist_t, dist_r = target.get_metric("distribution"), reference.get_metric("distribution")
    if dist_t is not None and dist_r is not None and not dist_t.kll.value.is_empty() \
            and not dist_r.kll.value.is_empty():
        import numpy as np

        kt, kr = dist_t.kll.value, dist_r.kll.value
        lo = min(kt.get_min_value(), kr.get_min_value())
        hi = max(kt.get_max_value(), kr.get_max_value())
        if hi <= lo:
            return {"kind": "numeric", "edges": [float(lo), float(lo) + 1], "target": [1.0], "reference": [1.0]}
        edges = np.linspace(lo, hi, bins + 1)
        return {"kind": "numeric", "edges": [float(e) for e in edges],
                "target": [float(x) for x in kt.get_pmf(list(edges[1:-1]))],
                "reference": [float(x) for x in kr.get_pmf(list(edges[1:-1]))]}
    t, r = _shares(target), _shares(reference)
    keys = sorted(set(t) | set(r), key=lambda k: -(t.get(k, 0) + r.get(k, 0)))[:12]
    return {"kind": "categorical", "values": keys, "target": [t.get(k, 0.0) for k in keys],
            "reference": [r.get(k, 0.0) for k in keys]}
