import numpy as np
import pandas as pd
import pytest

from nightshift.monitoring.drift import DriftPolicy, MetricRule, compare
from nightshift.monitoring.profiles import profile_frame

POLICY = DriftPolicy(min_documents=30, metrics={
    "chars": MetricRule("hellinger", 0.15, 0.4), "language": MetricRule("hellinger", 0.1, 0.25),
    "words": MetricRule("ks", 0.1, 0.01),
})


def corpus(n, seed, mean_chars=1000.0, german=0.1):
    rng = np.random.default_rng(seed)
    chars = rng.lognormal(np.log(mean_chars), 0.5, n).astype(int) + 1
    return profile_frame(pd.DataFrame({
        "id": [str(i) for i in range(n)], "chars": chars, "words": chars // 6,
        "language": np.where(rng.random(n) < german, "de", "en"),
    }))


def test_two_samples_of_one_distribution_do_not_drift_at_any_size():
    for n in (200, 20_000):
        result = compare(corpus(n, 1), corpus(n, 2), POLICY, "previous", "corpus-v0001")
        assert result.metrics["chars"]["category"] == "no_drift", result.metrics["chars"]
        assert result.metrics["language"]["category"] == "no_drift"


def test_longer_documents_and_another_language_mix_drift():
    result = compare(corpus(5000, 1, mean_chars=4000, german=0.6), corpus(5000, 2), POLICY, "previous", "corpus-v0001")
    assert result.status == "drift" and {"chars", "language"} <= set(result.drifted)
    assert result.metrics["chars"]["statistic"] > 0.4 and result.metrics["language"]["statistic"] > 0.25
    shape = result.metrics["language"]["shape"]
    assert shape["kind"] == "categorical" and dict(zip(shape["values"], shape["target"], strict=True))["de"] > 0.5
    assert result.metrics["words"]["algorithm"] == "ks" and result.metrics["words"]["p_value"] < 0.01


def test_a_small_shift_is_possible_drift_not_drift():
    result = compare(corpus(20_000, 1, mean_chars=1300), corpus(20_000, 2), POLICY, "previous", "v")
    assert result.metrics["chars"]["category"] == "possible_drift", result.metrics["chars"]["statistic"]


def test_too_few_documents_are_not_compared():
    result = compare(corpus(10, 1), corpus(500, 2), POLICY, "champion", "corpus-v0003")
    assert result.status == "not_compared" and "min_documents" in result.reason


def test_shipped_policy_loads_and_bad_policies_say_what_to_change(tmp_path):
    policy = DriftPolicy.load()
    assert not policy.block and {"chars", "language", "tokens"} <= set(policy.metrics)
    cases = {
        "metrics: {chars: {algorithm: wasserstein}}": "metrics.chars: algorithm must be one of",
        "metrics: {chars: {algorithm: hellinger, possible_drift: 0.5, drift: 0.2}}": "possible_drift <= drift",
        "metrics: {chars: {algorithm: ks, possible_drift: 0.01, drift: 0.05}}": "drift <= possible_drift",
        "metrics: {chars: {limit: 3}}": "unknown settings",
        "references: [yesterday]\nmetrics: {chars: {}}": "references",
        "block: maybe\nmetrics: {chars: {}}": "block must be true or false",
        "alert: drift\nmetrics: {chars: {}}": "unknown settings",
        "metrics: {}": "name at least one",
    }
    for text, message in cases.items():
        path = tmp_path / "drift.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            DriftPolicy.load(path)
