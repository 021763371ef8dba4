"""The pieces of monitor_model's judgement: what a prompt is, the Wilson interval, the domain classifier, the policy."""

import math

import numpy as np
import pytest
import yaml

from nightshift.monitoring.live import domain_drift, is_error, prompt_text, wilson
from nightshift.monitoring.policy import MonitoringPolicy


def test_the_prompt_is_the_last_user_message_or_the_prompts():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "second"}]}]
    assert prompt_text(chat) == "second"
    assert prompt_text(["one", "two"]) == "one\ntwo" and prompt_text("plain") == "plain"
    assert prompt_text({"odd": 1}) == "" and prompt_text([{"role": "system", "content": "x"}]) == ""
    assert is_error("length,timeout") and is_error("error") and not is_error("stop") and not is_error(None)


def test_wilson_matches_the_textbook_and_stays_inside_zero_and_one():
    low, high = wilson(5, 20, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.1119, 0.4687)
    assert wilson(0, 10, 0.95)[0] == 0.0 and wilson(10, 10, 0.95)[1] <= 1.0
    assert all(math.isnan(x) for x in wilson(0, 0, 0.95))


def test_the_domain_classifier_tells_shifted_embeddings_apart_and_not_equal_ones():
    rng = np.random.default_rng(0)
    same = domain_drift(rng.normal(size=(200, 64)), rng.normal(size=(200, 64)), 7)
    shifted = domain_drift(rng.normal(size=(200, 64)), rng.normal(size=(200, 64)) + 0.3, 7)
    assert same < 0.62 < shifted


@pytest.mark.parametrize(("data", "says"), [
    ({"drift": {"auc_threshold": 0.4}}, r"monitoring.yaml: drift.auc_threshold must be a number in \(0.5, 1\)"),
    ({"window": {"min_answers": 0}}, r"window.min_answers must be a positive integer"),
    ({"window": {"min_answers": 50, "max_answers": 10}}, r"window.max_answers must be an integer >= min_answers"),
    ({"feedback": {"max_error_rate": 2}}, r"feedback.max_error_rate must be a fraction"),
    ({"incidents": {"repeat_hours": -1}}, r"incidents.repeat_hours must be a positive number"),
    ({"drift": {"auc": 0.7}}, r"drift: unknown settings \['auc'\]"),
    ({"alerts": {}}, r"unknown sections \['alerts'\]"),
    ({"window": {"min_answers": "many"}}, r"window.min_answers must be an integer"),
    ({"retrain": {"checks": ["latency"]}}, r"retrain.checks: unknown checks \['latency'\]"),
    ({"retrain": {"min_hours_between": 0}}, r"retrain.min_hours_between must be a positive number"),
])
def test_policy_errors_name_the_field(tmp_path, data, says):
    path = tmp_path / "monitoring.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=says):
        MonitoringPolicy.load(path)


def test_the_shipped_policy_loads():
    policy = MonitoringPolicy.load()
    assert policy.drift.auc_threshold > 0.5 and policy.incidents.repeat_hours > 0


def test_an_hour_given_with_an_offset_is_the_same_utc_hour_and_feedback_without_raters_is_plain_json():
    import json
    from datetime import datetime

    from nightshift.pipelines.monitor import _feedback, hour_bounds

    start, end = hour_bounds(datetime.fromisoformat("2026-12-01T11:30:00+02:00"))
    assert (start.isoformat(), end.isoformat()) == ("2026-12-01T08:00:00+00:00", "2026-12-01T09:00:00+00:00")
    nobody = _feedback({2: {"answers": 5.0}}, {"champion": 2, "previous": 1}, MonitoringPolicy())
    assert not nobody["judged"] and nobody["champion"]["negative_share"] is None
    json.dumps(nobody, allow_nan=False)  # XCom refuses NaN
