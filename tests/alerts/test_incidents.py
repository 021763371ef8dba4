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
            incidents.delivered(notice.fingerprint, f"run-{hour}")
    assert sent == [(1, "opened"), (4, "resolved"), (6, "opened")]
    notice = incidents.observe(check(True), "run-30", T0 + timedelta(hours=30, minutes=1))
    assert notice.kind == "repeat" and "still failing" in notice.title and "Open since" in notice.message
    assert incidents.observe(check(True), "run-31", T0 + timedelta(hours=31)) is None  # within the interval


def test_a_retried_evaluation_sends_a_delivered_notice_never_and_an_undelivered_one_again(tmp_path):
    incidents = book(tmp_path)
    first = incidents.observe(check(True), "run-1", T0)
    assert first.kind == "opened"
    # The task died before delivery: its retry gets the same notice.
    again = incidents.observe(check(True), "run-1", T0 + timedelta(minutes=5))
    assert again.kind == "opened" and again.fingerprint == first.fingerprint
    incidents.delivered(first.fingerprint, "run-1")
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
