"""Paired bootstrap intervals: known by construction, seeded, and read by the gate."""

import math

import numpy as np
import pytest

from nightshift.evaluation.compare import compare, mean_difference, paired_bootstrap
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.suite import BootstrapSettings, EvaluationSuite
from nightshift.records import EvaluationReport
from nightshift.settings import GOLDEN_QA

SETTINGS = BootstrapSettings(resamples=2000, confidence=0.95, seed=7)


def _suite(metrics=("golden.token_f1",)):
    return EvaluationSuite(golden_set=GOLDEN_QA, metrics=tuple(metrics), bootstrap=SETTINGS,
                           refusal_markers=("i can't",))


def _report(name, f1s, refused=(), judge=None):
    examples = [{"id": f"a{i}", "question": "q", "reference": "r", "expect": "answer", "answer": f"x{i}",
                 "token_f1": v, "judge": (judge[i] if judge else None)} for i, v in enumerate(f1s)]
    examples += [{"id": f"r{i}", "question": "q", "reference": "r", "expect": "refuse", "answer": "", "refused": v}
                 for i, v in enumerate(refused)]
    return EvaluationReport(model=name, metrics={}, heldout_tokens=0, golden_items=len(examples), examples=examples,
                            judge={"enabled": judge is not None, "note": "no judge configured"})


def test_a_constant_difference_has_a_zero_width_interval():
    base = np.random.default_rng(1).uniform(0, 1, 40)
    assert paired_bootstrap(mean_difference, (base + 0.25, base), SETTINGS, "m") == pytest.approx((0.25, 0.25))


def test_the_interval_matches_the_normal_theory_one_for_a_large_sample():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, 2000)
    diff = rng.normal(0.05, 0.2, 2000)
    low, high = paired_bootstrap(mean_difference, (base + diff, base), SETTINGS, "m")
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert low == pytest.approx(diff.mean() - half, abs=0.002)
    assert high == pytest.approx(diff.mean() + half, abs=0.002)


def test_pairing_removes_what_both_models_share():
    """Examples differ a lot in difficulty, the models by a steady 0.1: only a paired interval sees that."""
    rng = np.random.default_rng(5)
    difficulty = rng.uniform(0, 1, 30)
    low, high = paired_bootstrap(mean_difference, (difficulty + 0.1 + rng.normal(0, 0.01, 30), difficulty),
                                 SETTINGS, "m")
    assert 0.09 < low < 0.1 < high < 0.11


def test_intervals_are_reproducible_and_seeded_per_metric():
    rng = np.random.default_rng(9)
    c, b = rng.uniform(0, 1, 25), rng.uniform(0, 1, 25)
    first = paired_bootstrap(mean_difference, (c, b), SETTINGS, "golden.token_f1")
    assert paired_bootstrap(mean_difference, (c, b), SETTINGS, "golden.token_f1") == first
    assert paired_bootstrap(mean_difference, (c, b), BootstrapSettings(seed=8), "golden.token_f1") != first


def test_better_on_average_but_within_noise_is_not_promoted_when_a_significant_gain_is_required(tmp_path):
    rng = np.random.default_rng(11)
    base = rng.uniform(0.2, 0.8, 12)
    cand = np.clip(base + 0.03 + rng.normal(0, 0.15, 12), 0, 1)
    assert cand.mean() > base.mean()  # better on average
    comparisons = compare(_report("candidate", cand.tolist()), _report("champion", base.tolist()), _suite())
    f1 = comparisons[0]
    assert f1.difference > 0 and f1.low < 0 < f1.high
    policy_file = tmp_path / "gate.yaml"
    policy_file.write_text("rules:\n  - {metric: golden.token_f1, lower_bound_above: 0.0}\n")
    decision = decide(comparisons, "champion", GatePolicy.load(policy_file))
    assert not decision.passed and "lower bound > +0" in decision.reasons[0] and "FAILED" in decision.reasons[0]
    # The same numbers pass a policy that only forbids a real loss.
    policy_file.write_text("rules:\n  - {metric: golden.token_f1, lower_bound_above: -0.2}\n")
    assert decide(comparisons, "champion", GatePolicy.load(policy_file)).passed


def test_judge_metrics_pair_only_examples_both_models_got_scores_for():
    s = {"correctness": 1.0, "groundedness": 1.0, "refused": False}
    cand = _report("c", [0.5] * 4, judge=[s, None, s, s])
    base = _report("b", [0.5] * 4, judge=[{**s, "correctness": 0.5}, s, None, s])
    (judged,) = compare(cand, base, _suite(["judge.correctness"]))
    assert (judged.n, judged.items) == (2, 4) and judged.difference == pytest.approx(0.25)


def test_without_a_judge_its_metrics_are_unmeasured_not_zero():
    (judged,) = compare(_report("c", [0.5, 0.6]), _report("b", [0.5, 0.6]), _suite(["judge.correctness"]))
    assert judged.unmeasured == "no judge configured" and math.isnan(judged.difference)
