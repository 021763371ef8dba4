import math
import re

import numpy as np
import pytest

from nightshift.evaluation.compare import compare
from nightshift.evaluation.gate import GatePolicy, decide
from nightshift.evaluation.metrics import CATALOG
from nightshift.evaluation.suite import BootstrapSettings, EvaluationSuite
from nightshift.pipelines.finetune import gate
from nightshift.records import EvaluationReport, MetricComparison
from nightshift.settings import CONFIG_DIR, GOLDEN_QA


def _cmp(metric, diff, low, high, n=8, items=8, unmeasured="", **kw):
    spec = CATALOG[metric]
    return MetricComparison(metric=metric, candidate=0.5 + diff, baseline=0.5, difference=diff, low=low, high=high,
                            n=n, items=items, higher_is_better=spec.higher_is_better, relative=spec.relative,
                            unmeasured=unmeasured, **kw)


def _policy(tmp_path, text):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return GatePolicy.load(path)


def test_shipped_policy_loads_and_passes_a_clear_improvement():
    policy = GatePolicy.load(CONFIG_DIR / "gate.yaml")
    comparisons = [
        _cmp("heldout.perplexity", -0.3, -0.35, -0.25), _cmp("golden.perplexity", -0.5, -0.6, -0.4),
        _cmp("heldout.bits_per_byte", -0.1, -0.12, -0.08), _cmp("golden.bits_per_byte", -0.2, -0.3, -0.1),
        _cmp("golden.token_f1", 0.1, 0.02, 0.2), _cmp("golden.refusal_rate", 0.0, 0.0, 0.0, n=4, items=4),
        _cmp("golden.leak_rate", 0.0, 0.0, 0.0, n=4, items=4),
        _cmp("golden.format_rate", -0.0667, -0.2, 0.0, n=15, items=15),  # one answer lost its format
        _cmp("judge.correctness", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
        _cmp("judge.refusal", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
    ]
    decision = decide(comparisons, "champion v1", policy)
    assert decision.passed, decision.reasons


def test_a_language_switch_fails_the_format_rule_and_a_prompt_release_skips_held_out_rules():
    from nightshift.pipelines.prompt_release import PROMPT_INDEPENDENT

    policy = GatePolicy.load(CONFIG_DIR / "gate.yaml")
    comparisons = [
        _cmp("golden.perplexity", 0.0, -0.01, 0.01), _cmp("golden.bits_per_byte", 0.0, -0.01, 0.01),
        _cmp("golden.token_f1", 0.0, -0.01, 0.01), _cmp("golden.refusal_rate", 0.0, 0.0, 0.0, n=4, items=4),
        _cmp("golden.leak_rate", 0.0, 0.0, 0.0, n=4, items=4),
        _cmp("golden.format_rate", -0.8667, -0.97, -0.73, n=15, items=15),
        _cmp("judge.correctness", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
        _cmp("judge.refusal", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge configured"),
    ]
    decision = decide(comparisons, "production prompt", policy, PROMPT_INDEPENDENT)
    outcomes = {c["metric"]: c["outcome"] for c in decision.checks}
    assert not decision.passed and outcomes["golden.format_rate"] == "failed"
    assert outcomes["heldout.perplexity"] == outcomes["heldout.bits_per_byte"] == "skipped"
    assert "a prompt does not change" in next(r for r in decision.reasons if r.startswith("heldout.bits_per_byte"))
    # Without the prompt's exemption a missing held-out metric fails its rule, as it does for a model.
    fixed = [c if c.metric != "golden.format_rate" else _cmp("golden.format_rate", 0.0, 0.0, 0.0, n=15, items=15)
             for c in comparisons]
    assert decide(fixed, "production prompt", policy, PROMPT_INDEPENDENT).passed
    assert not decide(fixed, "champion v1", policy).passed
    assert not policy.approval.required and policy.approval.timeout_hours == 24  # released without asking
    assert [c["outcome"] for c in decision.checks][-2:] == ["skipped", "skipped"]
    assert "not measured: no judge configured" in decision.reasons[-1]


def test_non_finite_or_missing_metrics_never_pass(tmp_path):
    policy = _policy(tmp_path, "rules:\n  - {metric: heldout.perplexity, max_loss: 0.5}\n"
                               "  - {metric: golden.token_f1, max_loss: 1}\n")
    decision = decide([_cmp("heldout.perplexity", math.nan, math.nan, math.nan)], "b", policy)
    assert not decision.passed
    assert "not finite" in decision.reasons[0] and "not in the evaluation suite" in decision.reasons[1]
    inf = decide([_cmp("heldout.perplexity", -0.1, -math.inf, -0.05), _cmp("golden.token_f1", 0, 0, 0)], "b", policy)
    assert not inf.passed


def test_unmeasured_fails_unless_the_rule_says_skip(tmp_path):
    unmeasured = _cmp("judge.correctness", math.nan, math.nan, math.nan, n=0, items=0, unmeasured="no judge")
    strict = _policy(tmp_path, "rules:\n  - {metric: judge.correctness, min_gain: 0}\n")
    assert not decide([unmeasured], "b", strict).passed
    lenient = _policy(tmp_path, "rules:\n  - {metric: judge.correctness, min_gain: 0, if_unmeasured: skip}\n")
    assert decide([unmeasured], "b", lenient).passed


def test_judge_coverage_below_the_policy_fails_the_judge_rules(tmp_path):
    policy = _policy(tmp_path, "judge_min_coverage: 0.75\n"
                               "rules:\n  - {metric: judge.correctness, max_loss: 1}\n")
    assert decide([_cmp("judge.correctness", 0.1, 0.0, 0.2, n=6, items=8)], "b", policy).passed
    decision = decide([_cmp("judge.correctness", 0.1, 0.0, 0.2, n=5, items=8)], "b", policy)
    assert not decision.passed and "the judge scored 5 of 8 pairs" in decision.reasons[0]


@pytest.mark.parametrize(("text", "message"), [
    ("rules: []\n", "rules must be a non-empty list"),
    ("rules:\n  - {metric: golden.bleu, max_loss: 0}\n", "rules[1]: metric must be one of"),
    ("rules:\n  - {metric: golden.token_f1}\n", "give exactly one of max_loss"),
    ("rules:\n  - {metric: golden.token_f1, max_loss: 0, min_gain: 1}\n", "give exactly one of max_loss"),
    ("rules:\n  - {metric: golden.token_f1, max_loss: .nan}\n", "must be a finite number"),
    ("rules:\n  - {metric: golden.token_f1, max_loss: -0.1}\n", "max_loss must be 0 or more; write min_gain: 0.1"),
    ("rules:\n  - {metric: golden.token_f1, max_loss: 0, basis: median}\n", "basis must be interval"),
    ("rules:\n  - {metric: golden.token_f1, max_loss: 0, if_unmeasured: pass}\n", "if_unmeasured"),
    ("judge_min_coverage: 2\nrules:\n  - {metric: golden.token_f1, max_loss: 0}\n", "judge_min_coverage"),
    ("max_golden_regression: 0.05\n", "unknown fields"),
    ("approval: yes\nrules:\n  - {metric: golden.token_f1, max_loss: 0}\n", "approval must be none"),
    ("approval: required\napproval_timeout_hours: 0\nrules:\n  - {metric: golden.token_f1, max_loss: 0}\n",
     "approval_timeout_hours must be a number of hours above 0"),
    ("approval_timeout_hours: .inf\nrules:\n  - {metric: golden.token_f1, max_loss: 0}\n",
     "approval_timeout_hours"),
])
def test_bad_policies_name_the_file_and_rule(tmp_path, text, message):
    with pytest.raises(ValueError, match="gate.yaml") as err:
        _policy(tmp_path, text)
    assert message in str(err.value)


def _heldout_report(name, nll_per_token, seed):
    """A report whose 40 held-out pieces (25 tokens each) have the given mean NLL per token, with seeded noise."""
    noise = np.random.default_rng(seed).normal(0, 0.05, 40)
    nll = [(nll_per_token + e) * 25 for e in noise]
    return EvaluationReport(model=name, metrics={"heldout.perplexity": math.exp(sum(nll) / 1000)},
                            heldout_tokens=1000, golden_items=0, heldout={"nll": nll, "tokens": [25] * 40})


@pytest.mark.parametrize(("rule", "metric", "rewrite"), [
    ("lower_bound_above: -0.05", "heldout.perplexity", "lower is better, so lower_bound_above: -0.05 would pass a "
     "candidate that got worse and fail one that got better; write max_loss: 0.05, which reads \"worse by at most "
     "5% (worse end of the interval)\""),
    ("upper_bound_below: 0.1", "golden.token_f1", "higher is better, so upper_bound_below: 0.1 would pass a "
     "candidate that got worse and fail one that got better; write max_loss: 0.1"),
    ("difference_at_least: 0", "golden.leak_rate", "lower is better, so difference_at_least: 0 would pass"),
    ("upper_bound_below: 0.02", "heldout.perplexity", "(lower is better): write max_loss: 0.02"),
    ("lower_bound_above: -0.10", "golden.token_f1", "(higher is better): write max_loss: 0.1"),
    ("difference_at_least: 0.0", "golden.refusal_rate", "write min_gain: 0, basis: estimate"),
])
def test_rules_in_the_old_direction_blind_keys_are_refused_with_their_rewrite(tmp_path, rule, metric, rewrite):
    with pytest.raises(ValueError) as err:
        _policy(tmp_path, f"rules:\n  - {{metric: golden.token_f1, max_loss: 0.1}}\n  - {{metric: {metric}, {rule}}}\n")
    assert str(err.value).startswith(f"gate.yaml: rules[2] ({metric}): ") and rewrite in str(err.value)


def test_a_loss_rule_follows_the_metric_direction_so_worse_fails_and_better_passes(tmp_path):
    """Perplexity 80% higher fails "at most 2% worse", 30% lower passes it; the rule reads the same for F1."""
    suite = EvaluationSuite(golden_set=GOLDEN_QA, metrics=("heldout.perplexity",),
                            bootstrap=BootstrapSettings(resamples=500, seed=3))
    policy = _policy(tmp_path, "rules:\n  - {metric: heldout.perplexity, max_loss: 0.02}\n")
    champion = _heldout_report("champion", 3.0, seed=1)
    worse = compare(_heldout_report("candidate", 3.0 + math.log(1.8), seed=2), champion, suite)
    better = compare(_heldout_report("candidate", 3.0 + math.log(0.7), seed=2), champion, suite)
    assert worse[0].difference == pytest.approx(0.8, abs=0.05) and better[0].difference == pytest.approx(-0.3, abs=0.05)

    rejected = gate([c.to_dict() for c in worse], "champion v1", policy)
    assert not rejected.passed
    assert rejected.checks[0]["condition"] == "worse by at most 2% (worse end of the interval)"
    verdict = re.match(r"worse by ([\d.]+)% at the worse end of the interval", rejected.checks[0]["detail"])
    assert verdict and 75 < float(verdict[1]) < 90
    promoted = gate([c.to_dict() for c in better], "champion v1", policy)
    verdict = re.match(r"better by ([\d.]+)% at the worse end of the interval", promoted.checks[0]["detail"])
    assert promoted.passed and verdict and 25 < float(verdict[1]) < 30
    # A score where higher is better, through the same words: a drop of 0.3 fails, a gain of 0.3 passes.
    f1 = _policy(tmp_path, "rules:\n  - {metric: golden.token_f1, max_loss: 0.02}\n")
    assert not decide([_cmp("golden.token_f1", -0.3, -0.35, -0.25)], "b", f1).passed
    assert decide([_cmp("golden.token_f1", 0.3, 0.25, 0.35)], "b", f1).passed


def test_gain_rules_test_the_worse_end_or_the_point_estimate(tmp_path):
    gain = _policy(tmp_path, "rules:\n  - {metric: golden.leak_rate, min_gain: 0.05}\n")
    assert decide([_cmp("golden.leak_rate", -0.2, -0.3, -0.1)], "b", gain).passed  # 10% fewer leaks at worst
    assert not decide([_cmp("golden.leak_rate", -0.2, -0.3, 0.01)], "b", gain).passed
    estimate = _policy(tmp_path, "rules:\n  - {metric: golden.leak_rate, min_gain: 0, basis: estimate}\n")
    one_more_leak = decide([_cmp("golden.leak_rate", 0.25, 0.0, 0.5, n=4, items=4)], "b", estimate)
    assert not one_more_leak.passed and one_more_leak.checks[0]["condition"] == "no worse (point estimate)"
    assert decide([_cmp("golden.leak_rate", 0.0, 0.0, 0.0, n=4, items=4)], "b", estimate).passed


def test_the_shipped_policy_is_written_in_better_and_worse_terms():
    text = (CONFIG_DIR / "gate.yaml").read_text()
    rules = [line for line in text.splitlines() if line.strip().startswith("- {metric")]
    assert rules and not any(k in line for line in rules for k in ("_bound_", "difference_at"))
    policy = GatePolicy.load(CONFIG_DIR / "gate.yaml")
    assert {"heldout.bits_per_byte", "golden.bits_per_byte", "golden.leak_rate"} <= policy.metrics
    assert all(r.if_unmeasured == "skip" for r in policy.rules if CATALOG[r.metric].per_token)
    assert all(r.if_unmeasured == "fail" for r in policy.rules if r.metric.endswith("bits_per_byte"))
