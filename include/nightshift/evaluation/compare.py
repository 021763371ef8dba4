"""Candidate against champion, metric by metric, with paired bootstrap confidence intervals over examples.

Both models answered the same examples, so each resample draws example indices once and applies them to
both (scipy.stats.bootstrap with ``paired=True``): the interval reflects how much the difference depends on
which examples happened to be in the set, not the variation between unrelated samples. Percentile
intervals: they stay defined when every resample agrees (BCa does not). Each metric's resampling is seeded
from the suite's seed and the metric's name, so a rerun, or adding a metric, leaves every interval as it was.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

from nightshift.evaluation.harness import per_example
from nightshift.evaluation.metrics import CATALOG
from nightshift.evaluation.suite import BootstrapSettings, EvaluationSuite
from nightshift.records import EvaluationReport, MetricComparison


def metric_seed(seed: int, metric: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{metric}".encode()).digest()[:8], "big")


def paired_bootstrap(
    statistic: Callable[..., np.ndarray], data: tuple[np.ndarray, ...], settings: BootstrapSettings, metric: str,
) -> tuple[float, float]:
    """Return the (low, high) percentile interval of ``statistic`` over paired resamples of ``data``.

    ``statistic`` takes the arrays (resampled along the last axis) and returns one value per resample.
    Fewer than two examples give (nan, nan): there is nothing to resample.
    """
    from scipy.stats import bootstrap

    n = len(data[0])
    if n < 2:
        return math.nan, math.nan
    if all(np.all(d == d[0]) for d in data):  # every resample is the same sample
        value = float(statistic(*[d[None, :] for d in data])[0])
        return value, value
    with np.errstate(all="ignore"):
        result = bootstrap(data, lambda *arrays, axis=-1: statistic(*arrays), paired=True, vectorized=True,
                           n_resamples=settings.resamples, confidence_level=settings.confidence,
                           method="percentile", rng=np.random.default_rng(metric_seed(settings.seed, metric)))
    low, high = result.confidence_interval
    return float(low), float(high)


def mean_difference(candidate: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    return np.mean(candidate, axis=-1) - np.mean(baseline, axis=-1)


def perplexity_change(c_nll: np.ndarray, c_tok: np.ndarray, b_nll: np.ndarray, b_tok: np.ndarray) -> np.ndarray:
    """Relative change of perplexity, exp(mean NLL_c - mean NLL_b) - 1, token-weighted within each resample."""
    c = np.sum(c_nll, axis=-1) / np.maximum(np.sum(c_tok, axis=-1), 1)
    b = np.sum(b_nll, axis=-1) / np.maximum(np.sum(b_tok, axis=-1), 1)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.expm1(c - b)


def compare(candidate: EvaluationReport, baseline: EvaluationReport, suite: EvaluationSuite) -> list[MetricComparison]:
    """Return one comparison per metric of the suite, measured or not."""
    out = []
    for metric in suite.metrics:
        spec = CATALOG[metric]
        base = {"metric": metric, "higher_is_better": spec.higher_is_better, "relative": spec.relative,
                "safety": spec.safety}
        nan = {"candidate": math.nan, "baseline": math.nan, "difference": math.nan, "low": math.nan,
               "high": math.nan}
        if spec.judge and not (candidate.judge.get("enabled") and baseline.judge.get("enabled")):
            note = candidate.judge.get("note") or baseline.judge.get("note") or "no judge configured"
            out.append(MetricComparison(**base, **nan, n=0, items=0, unmeasured=note))
            continue
        if spec.relative:
            out.append(_compare_perplexity(metric, candidate, baseline, suite.bootstrap, base, nan))
            continue
        ids_c, vals_c = per_example(candidate.examples, metric)
        ids_b, vals_b = per_example(baseline.examples, metric)
        if ids_c != ids_b:
            raise ValueError(f"{metric}: candidate and champion were evaluated on different examples")
        pairs = [(c, b) for c, b in zip(vals_c, vals_b, strict=True) if c is not None and b is not None]
        if not ids_c:
            out.append(MetricComparison(**base, **nan, n=0, items=0, unmeasured="the golden set has no such items"))
            continue
        if not pairs:
            out.append(MetricComparison(**base, **nan, n=0, items=len(ids_c)))
            continue
        c = np.array([p[0] for p in pairs], dtype=float)
        b = np.array([p[1] for p in pairs], dtype=float)
        low, high = paired_bootstrap(mean_difference, (c, b), suite.bootstrap, metric)
        out.append(MetricComparison(**base, candidate=float(c.mean()), baseline=float(b.mean()),
                                    difference=float(c.mean() - b.mean()), low=low, high=high, n=len(pairs),
                                    items=len(ids_c)))
    return out


def _compare_perplexity(metric, candidate, baseline, settings, base, nan) -> MetricComparison:
    if metric == "heldout.perplexity":
        if not candidate.heldout or not baseline.heldout:
            return MetricComparison(**base, **nan, n=0, items=0, unmeasured="no held-out split")
        data = (candidate.heldout["nll"], candidate.heldout["tokens"], baseline.heldout["nll"],
                baseline.heldout["tokens"])
    else:
        rows_c = [e for e in candidate.examples if e["expect"] == "answer" and "nll" in e]
        rows_b = [e for e in baseline.examples if e["expect"] == "answer" and "nll" in e]
        if [e["id"] for e in rows_c] != [e["id"] for e in rows_b]:
            raise ValueError(f"{metric}: candidate and champion were evaluated on different examples")
        data = ([e["nll"] for e in rows_c], [e["tokens"] for e in rows_c], [e["nll"] for e in rows_b],
                [e["tokens"] for e in rows_b])
    arrays = tuple(np.asarray(d, dtype=float) for d in data)
    if len(arrays[0]) != len(arrays[2]) or len(arrays[0]) == 0:
        return MetricComparison(**base, **nan, n=0, items=len(arrays[0]))
    point = float(perplexity_change(*[a[None, :] for a in arrays])[0])
    low, high = (paired_bootstrap(perplexity_change, arrays, settings, metric) if math.isfinite(point)
                 else (math.nan, math.nan))
    return MetricComparison(**base, candidate=candidate.metrics.get(metric, math.nan),
                            baseline=baseline.metrics.get(metric, math.nan), difference=point, low=low, high=high,
                            n=len(arrays[0]), items=len(arrays[0]))
