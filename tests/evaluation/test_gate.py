import math

import pytest

from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.records import MetricComparison
from nightshift.settings import CONFIG_DIR


def _cmp(metric, diff, low, high, n=8, items=8, unmeasured="", **kw):
    return MetricComparison(metric=metric, candidate=0.5 + diff, baseline=0.5, difference=diff, low=low, high=high,
                            n=n, items=items, higher_is_better=not metric.endswith("perplexity"),
                            relative=metric.endswith("perplexity"), unmeasured=unmeasured, **kw)


def _policy(tmp_path, text):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return GatePolicy.load(path)


def test_shipped_policy_loads_and_passes_a_clear_improvement():
    policy = GatePolicy.load(CONFIG_DIR / "gate.yaml")
    comparisons = [
        _cmp("heldout.perplexity", -0.3, -0.35, -0.25), _cmp("golden.perplexity", -0.5, -0.6, -0.4),
        _cmp("golden.token_f1", 0.1, 0.02, 0.2), _cmp("golden.refusal_rate", 0.0, 0.0, 0.0, n=4, items=4),
        _cmp("judge.correctness", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
        _cmp("judge.refusal", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
    ]
    decision = decide(comparisons, "champion v1", policy)
    assert decision.passed, decision.reasons
    assert [c["outcome"] for c in decision.checks][-2:] == ["skipped", "skipped"]
    assert "not measured: no judge configured" in decision.reasons[-1]


def test_non_finite_or_missing_metrics_never_pass(tmp_path):
    policy = _policy(tmp_path, "rules:\n  - {metric: heldout.perplexity, upper_bound_below: 0.5}\n"
                               "  - {metric: golden.token_f1, lower_bound_above: -1}\n")
    decision = decide([_cmp("heldout.perplexity", math.nan, math.nan, math.nan)], "b", policy)
    assert not decision.passed
    assert "not finite" in decision.reasons[0] and "not in the evaluation suite" in decision.reasons[1]
    inf = decide([_cmp("heldout.perplexity", -0.1, -math.inf, -0.05), _cmp("golden.token_f1", 0, 0, 0)], "b", policy)
    assert not inf.passed


def test_unmeasured_fails_unless_the_rule_says_skip(tmp_path):
    unmeasured = _cmp("judge.correctness", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge")
    strict = _policy(tmp_path, "rules:\n  - {metric: judge.correctness, lower_bound_above: 0}\n")
    assert not decide([unmeasured], "b", strict).passed
    lenient = _policy(tmp_path, "rules:\n  - {metric: judge.correctness, lower_bound_above: 0, if_unmeasured: skip}\n")
    assert decide([unmeasured], "b", lenient).passed


def test_judge_coverage_below_the_policy_fails_the_judge_rules(tmp_path):
    policy = _policy(tmp_path, "judge_min_coverage: 0.75\n"
                               "rules:\n  - {metric: judge.correctness, lower_bound_above: -1}\n")
    assert decide([_cmp("judge.correctness", 0.1, 0.0, 0.2, n=6, items=8)], "b", policy).passed
    decision = decide([_cmp("judge.correctness", 0.1, 0.0, 0.2, n=5, items=8)], "b", policy)
    assert not decision.passed and "the judge scored 5 of 8 pairs" in decision.reasons[0]


@pytest.mark.parametrize(("text", "message"), [
    ("rules: []\n", "rules must be a non-empty list"),
    ("rules:\n  - {metric: golden.bleu, lower_bound_above: 0}\n", "rules[1]: metric must be one of"),
    ("rules:\n  - {metric: golden.token_f1}\n", "give exactly one of"),
    ("rules:\n  - {metric: golden.token_f1, lower_bound_above: 0, upper_bound_below: 1}\n", "give exactly one of"),
    ("rules:\n  - {metric: golden.token_f1, lower_bound_above: .nan}\n", "must be a finite number"),
    ("rules:\n  - {metric: golden.token_f1, lower_bound_above: 0, if_unmeasured: pass}\n", "if_unmeasured"),
    ("judge_min_coverage: 2\nrules:\n  - {metric: golden.token_f1, lower_bound_above: 0}\n", "judge_min_coverage"),
    ("max_golden_regression: 0.05\n", "unknown fields"),
])
def test_bad_policies_name_the_file_and_rule(tmp_path, text, message):
    with pytest.raises(ValueError, match="gate.yaml") as err:
        _policy(tmp_path, text)
    assert message in str(err.value)
