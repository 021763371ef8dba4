"""What a person answered an approval form, as the DAGs read it."""

from nightshift.airflow.hitl import answer_of


def test_an_answer_says_who_approved_and_why_and_no_answer_is_the_timeouts_rejection():
    approved = answer_of({"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "ada"},
                          "responded_at": "2026-12-06T08:00:00+00:00", "params_input": {"reason": " looks\nright "}})
    assert approved == {"approved": True, "by": "ada", "at": "2026-12-06T08:00:00+00:00", "reason": "looks right"}
    # The scheduler's sweep answers with the defaults (Reject) and no user once response_timeout has passed.
    timed_out = answer_of({"chosen_options": ["Reject"], "responded_by_user": None, "params_input": {"reason": None}})
    assert timed_out["approved"] is False and timed_out["by"] == "timeout" and timed_out["reason"] == ""
    assert answer_of(None)["approved"] is False
    assert len(answer_of({"chosen_options": ["Reject"], "params_input": {"reason": "x" * 5000}})["reason"]) == 1000
