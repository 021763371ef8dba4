import math

import pytest

from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.records import EvaluationReport


def report(name, ppl, golden):
    return EvaluationReport(model=name, perplexity=ppl, heldout_tokens=100, golden_perplexity=golden, golden_items=3)


POLICY = GatePolicy(max_perplexity_regression=0.0, max_golden_regression=0.05)


def test_better_candidate_passes():
    decision = decide(report("candidate", 9.0, 10.0), report("champion v1", 10.0, 10.0), POLICY)
    assert decision.passed and decision.baseline == "champion v1"


def test_clearly_worse_candidate_is_rejected_with_reasons():
    decision = decide(report("candidate", 30.0, 10.4), report("champion v1", 10.0, 10.0), POLICY)
    assert not decision.passed
    assert "perplexity: candidate 30 vs baseline 10 (limit 10) FAILED" in decision.reasons[0]
    assert decision.reasons[1].endswith("ok")  # within the 5% golden allowance


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_candidate_never_passes(bad):
    assert not decide(report("candidate", bad, bad), report("base", 10.0, 10.0), POLICY).passed


def test_policy_validation_and_shipped_file():
    with pytest.raises(ValueError, match="max_golden_regression must be a number >= 0"):
        GatePolicy(max_golden_regression=-1)
    assert isinstance(GatePolicy.load(), GatePolicy)
