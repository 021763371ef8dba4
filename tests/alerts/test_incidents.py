"""An incident opens once, reminds only after its interval, resolves once; a retried evaluation sends nothing twice."""

import threading
from datetime import UTC, datetime, timedelta

from nightshift.alerts.incidents import CheckResult, IncidentBook

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def check(failing: bool, subject: str = "v3") -> CheckResult:
    return CheckResult("monitor_model", "error_rate", subject, failing, f"{subject}: errors above the policy",
                       "7% of answers ended in an error", details={"error_rate": 0.07})


def book(tmp_path) -> IncidentBook:
    return IncidentBook(f"sqlite:///{tmp_path / 'incidents.db'}", timedelta(hours=24))


def test_a_flapping_night_alerts_once_reminds_after_the_interval_and_resolves_once(tmp_path):
    incidents = book(tmp_path)
    sent = []
    for hour, failing in enumerate([False, True, True, True, False, False, True]):
        notice = incidents.observe(check(failing), f"run-{hour}", T0 + timedelta(hours=hour))
        if notice:
            sent.append((hour, notice.kind))
            incidents.delivered(notice.fingerprint, f"run-{hour}", T0 + timedelta(hours=hour))
    assert sent == [(1, "opened"), (4, "resolved"), (6, "opened")]
    notice = incidents.observe(check(True), "run-30", T0 + timedelta(hours=30, minutes=1))
    assert notice.kind == "repeat" and "still failing" in notice.title and "Open since" in notice.message
    incidents.delivered(notice.fingerprint, "run-30", T0 + timedelta(hours=30, minutes=1))
    assert incidents.observe(check(True), "run-31", T0 + timedelta(hours=31)) is None  # within the interval


def test_a_retried_evaluation_sends_a_delivered_notice_never_and_an_undelivered_one_again(tmp_path):
    incidents = book(tmp_path)
    first = incidents.observe(check(True), "run-1", T0)
    assert first.kind == "opened"
    # The task died before delivery: its retry gets the same notice.
    again = incidents.observe(check(True), "run-1", T0 + timedelta(minutes=5))
    assert again.kind == "opened" and again.fingerprint == first.fingerprint
    incidents.delivered(first.fingerprint, "run-1", T0 + timedelta(minutes=5))
    assert incidents.observe(check(True), "run-1", T0 + timedelta(minutes=6)) is None
    assert [i["failures"] for i in incidents.open_incidents()] == [1]  # a retry is not a second failure


def test_subjects_are_incidents_of_their_own(tmp_path):
    incidents = book(tmp_path)
    assert incidents.observe(check(True, "v3"), "run-1", T0).kind == "opened"
    assert incidents.observe(check(True, "v4"), "run-1", T0).kind == "opened"
    assert incidents.observe(check(False, "v3"), "run-2", T0 + timedelta(hours=1)).kind == "resolved"
    assert [i["subject"] for i in incidents.open_incidents()] == ["v4"]


def test_two_runs_racing_on_one_check_open_one_incident(tmp_path):
    incidents = [book(tmp_path), book(tmp_path)]
    notices = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        notices.append(incidents[i].observe(check(True), f"run-{i}", T0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n.kind if n else "none" for n in notices) == ["none", "opened"]


def test_a_notice_the_channel_never_took_is_carried_to_the_next_evaluation(tmp_path):
    incidents = book(tmp_path)
    assert incidents.observe(check(True), "run-1", T0).kind == "opened"  # the channel is down: never delivered
    carried = incidents.observe(check(True), "run-2", T0 + timedelta(hours=1))
    assert carried.kind == "opened"  # not lost until the reminder a day later
    incidents.delivered(carried.fingerprint, "run-2", T0 + timedelta(hours=1))
    assert incidents.observe(check(True), "run-3", T0 + timedelta(hours=2)) is None
    assert incidents.observe(check(False), "run-4", T0 + timedelta(hours=3)).kind == "resolved"  # undelivered
    assert incidents.observe(check(False), "run-5", T0 + timedelta(hours=4)).kind == "resolved"  # carried


def test_an_open_incident_no_check_names_any_more_resolves(tmp_path):
    incidents = book(tmp_path)
    opened = incidents.observe(check(True, "v2"), "run-1", T0)
    incidents.delivered(opened.fingerprint, "run-1", T0)
    stale = incidents.stale("monitor_model", {check(True, "v3").fingerprint})
    assert [(s.subject, s.failing) for s in stale] == [("v2", False)]
    assert incidents.observe(stale[0], "run-2", T0 + timedelta(hours=1)).kind == "resolved"


def test_a_run_id_of_any_length_is_an_evaluation_key(tmp_path):
    incidents = book(tmp_path)
    key = "monitor_model/manual__" + "x" * 400
    assert incidents.observe(check(True), key, T0).kind == "opened"
    incidents.delivered(check(True).fingerprint, key, T0)
    assert incidents.observe(check(True), key, T0) is None


def test_retrains_are_rate_limited_a_retry_gets_its_own_again_and_two_racing_runs_get_one(tmp_path):
    incidents = [book(tmp_path), book(tmp_path)]
    every = timedelta(hours=24)
    granted = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        granted.append(incidents[i].claim_retrain(f"run-{i}", T0, every, f"drift seen by run {i}")["granted"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(granted) == [False, True]
    winner = "run-0" if incidents[0].claim_retrain("run-0", T0, every, "again")["granted"] else "run-1"
    assert incidents[0].claim_retrain(winner, T0, every, "a retry")["granted"]  # a retried task: the same one
    refused = incidents[0].claim_retrain("run-2", T0 + timedelta(hours=23), every, "still drifting")
    assert not refused["granted"] and refused["last_at"] == T0.isoformat()
    assert not incidents[0].claim_retrain("run-3", T0 - timedelta(hours=30), every, "an old hour")["granted"]
    assert incidents[1].claim_retrain("run-4", T0 + timedelta(hours=24), every, "a day later")["granted"]
