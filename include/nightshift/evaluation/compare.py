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


def rate_change(c_nll: np.ndarray, c_bytes: np.ndarray, b_nll: np.ndarray, b_bytes: np.ndarray) -> np.ndarray:
    """Relative change of bits per byte, bpb_c / bpb_b - 1, byte-weighted within each resample."""
    c = np.sum(c_nll, axis=-1) / np.maximum(np.sum(c_bytes, axis=-1), 1)
    b = np.sum(b_nll, axis=-1) / np.maximum(np.sum(b_bytes, axis=-1), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return c / b - 1


RATES: dict[str, tuple[str, str, Callable[..., np.ndarray]]] = {
    "heldout.perplexity": ("nll", "tokens", perplexity_change),
    "heldout.bits_per_byte": ("nll", "bytes", rate_change),
    "golden.perplexity": ("nll", "tokens", perplexity_change),
    "golden.bits_per_byte": ("answer_nll", "bytes", rate_change),
}
"""Rate metrics: the per-example sums (of the held-out pieces or the golden answers) and their statistic."""

NO_ITEMS = {"refuse": 'the golden set has no item with "expect": "refuse"',
            "secrets": "no golden item lists must_not_contain strings (plant strings an answer must never hold)",
            "format": "no answer has a format to keep: set answer_language in the suite or a format on golden items"}
"""Why a metric of the golden set is unmeasured when no item is of its kind."""

DIFFERENT_TOKENIZERS = ("the models use different tokenizers: perplexities per token are not comparable; gate on "
                        "heldout.bits_per_byte / golden.bits_per_byte")


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
        reason = candidate.unmeasured.get(metric) or baseline.unmeasured.get(metric)
        if reason:
            out.append(MetricComparison(**base, **nan, n=0, items=0, unmeasured=reason))
            continue
        if spec.per_token and candidate.tokenizer and baseline.tokenizer and candidate.tokenizer != baseline.tokenizer:
            out.append(MetricComparison(**base, **nan, n=0, items=0, unmeasured=DIFFERENT_TOKENIZERS))
            continue
        if metric in RATES:
            out.append(_compare_rate(metric, candidate, baseline, suite.bootstrap, base, nan))
            continue
        ids_c, vals_c = per_example(candidate.examples, metric)
        ids_b, vals_b = per_example(baseline.examples, metric)
        if ids_c != ids_b:
            raise ValueError(f"{metric}: candidate and champion were evaluated on different examples")
        pairs = [(c, b) for c, b in zip(vals_c, vals_b, strict=True) if c is not None and b is not None]
        if not ids_c:
            note = NO_ITEMS.get(spec.items, "the golden set has no such items")
            out.append(MetricComparison(**base, **nan, n=0, items=0, unmeasured=note))
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


def _compare_rate(metric, candidate, baseline, settings, base, nan) -> MetricComparison:
    total, count, statistic = RATES[metric]
    if metric.startswith("heldout."):
        if not candidate.heldout.get(count) or not baseline.heldout.get(count):
            note = (candidate.heldout.get("note") or baseline.heldout.get("note")
                    or ("no held-out split" if count == "tokens" else "the held-out split was packed without its text"))
            return MetricComparison(**base, **nan, n=0, items=0, unmeasured=note)
        data = (candidate.heldout[total], candidate.heldout[count], baseline.heldout[total], baseline.heldout[count])
    else:
        rows_c = [e for e in candidate.examples if e["expect"] == "answer" and total in e]
        rows_b = [e for e in baseline.examples if e["expect"] == "answer" and total in e]
        if [e["id"] for e in rows_c] != [e["id"] for e in rows_b]:
            raise ValueError(f"{metric}: candidate and champion were evaluated on different examples")
        data = ([e[total] for e in rows_c], [e[count] for e in rows_c], [e[total] for e in rows_b],
                [e[count] for e in rows_b])
    arrays = tuple(np.asarray(d, dtype=float) for d in data)
    if len(arrays[0]) != len(arrays[2]) or len(arrays[0]) == 0:
        return MetricComparison(**base, **nan, n=0, items=len(arrays[0]))
    point = float(statistic(*[a[None, :] for a in arrays])[0])
    low, high = (paired_bootstrap(statistic, arrays, settings, metric) if math.isfinite(point)
                 else (math.nan, math.nan))
    return MetricComparison(**base, candidate=candidate.metrics.get(metric, math.nan),
                            baseline=baseline.metrics.get(metric, math.nan), difference=point, low=low, high=high,
                            n=len(arrays[0]), items=len(arrays[0]))
