"""The rollout policy file and the verdict of a step on live signals."""

import math

import pytest

from nightshift.evaluation.rollout_policy import RolloutPolicy, judge_step

POLICY = RolloutPolicy(mode="canary", steps=(0.1, 0.5), step_minutes=10, min_answers=30,
                       max_error_rate_increase=0.02, max_latency_p95_ratio=1.5,
                       max_negative_feedback_increase=0.1, min_ratings=5)


def signals(answers=100, errors=0, p95=1.0, ratings=0, negative=math.nan):
    return {"answers": answers, "errors": errors, "p95_seconds": p95, "ratings": ratings, "negative_share": negative}


def test_the_shipped_policy_loads_and_is_off():
    policy = RolloutPolicy.load()
    assert policy.mode == "off" and all(0 < s < 1 for s in policy.steps)


@pytest.mark.parametrize(("text", "says"), [
    ("mode: blue", "mode must be one of"),
    ("steps: [0.5, 0.2]", "steps must grow"),
    ("steps: [0.5, 1.0]", "between 0 and 1"),
    ("steps: []", "non-empty list"),
    ("min_answers: 0", "min_answers must be a number"),
    ("max_latency_p95_ratio: 0.5", "max_latency_p95_ratio must be a number from 1"),
    ("step_minutes: 30\nmax_step_minutes: 10", "max_step_minutes must be at least step_minutes"),
    ("colour: red", "unknown fields ['colour']"),
])
def test_a_bad_policy_is_refused_naming_the_file_and_field(tmp_path, text, says):
    path = tmp_path / "rollout.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="rollout.yaml") as info:
        RolloutPolicy.load(path)
    assert says in str(info.value)


def test_a_bare_off_in_yaml_means_off(tmp_path):
    path = tmp_path / "rollout.yaml"
    path.write_text("mode: off\n")
    assert RolloutPolicy.load(path).mode == "off"


def test_a_step_waits_for_time_and_answers_of_both_versions():
    verdict = judge_step(signals(answers=10), signals(), 12, POLICY)
    assert not verdict.ready and "candidate answered 10 of 30" in verdict.reasons[0]
    verdict = judge_step(signals(), signals(), 3, POLICY)
    assert not verdict.ready and "3.0 of 10 minutes" in verdict.reasons[0]


def test_a_healthy_candidate_passes_and_feedback_is_skipped_without_ratings():
    verdict = judge_step(signals(errors=1, p95=1.2), signals(errors=0, p95=1.0), 11, POLICY)
    assert verdict.ready and verdict.passed
    assert any(r.startswith("feedback skipped") for r in verdict.reasons)


@pytest.mark.parametrize(("candidate", "says"), [
    (signals(errors=5), "error rate"),
    (signals(p95=1.6), "p95 latency"),
    (signals(p95=math.nan), "p95 latency"),
    (signals(ratings=10, negative=0.5), "negative feedback"),
])
def test_each_signal_can_fail_the_step(candidate, says):
    champion = signals(ratings=10, negative=0.2)
    verdict = judge_step(candidate, champion, 11, POLICY)
    assert verdict.ready and not verdict.passed
    assert [r for r in verdict.reasons if "FAILED" in r][0].startswith(says)
