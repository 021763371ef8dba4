"""harvest_feedback end to end: rated and corrected answers become a batch, a person approves it through
Airflow's REST API while the run waits (as the UI does), and the next ingest versions exactly the approved
documents, scrubbed, with their provenance; a rejected batch never reaches a corpus."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from cli_helpers import Approver, TimeoutSweeper, fresh, run

pytestmark = pytest.mark.e2e

CORRECTIONS = {
    "chatcmpl-a": ("When does the planetarium open on Sundays?",
                   "The planetarium opens at ten in the morning on Sundays and closes at six in the evening. "
                   "Write to visits@example.org for group bookings."),
    # Approved, then dropped by preparation (not English): it must not fail the night.
    "chatcmpl-g": ("Wann öffnet das Planetarium am Sonntag?",
                   "Das Planetarium öffnet am Sonntag um zehn Uhr morgens und schließt um sechs Uhr abends."),
    "chatcmpl-b": ("Can I bring a tripod to the observatory?",
                   "Tripods are welcome on the observation deck after sunset, but not inside the exhibition halls "
                   "during the day."),
}
RATED_WELL = {"chatcmpl-c": ("Is there parking near the science centre?",
                             "There is a public car park two streets north of the science centre, open all day.")}
RATED_BADLY = {"chatcmpl-d": ("Where is the cafe?", "The cafe is closed forever and nobody knows why at all.")}


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")  # the REST client's token
    settings = load_settings()
    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    return settings


def log_and_rate(settings, answers, rating, corrected):
    from nightshift.serving.requestlog import LoggedAnswer, RequestLog

    request_log = RequestLog(settings.request_log_url)
    request_log.open()
    request_log.start()
    for rid, (question, answer) in answers.items():
        request_log.record(LoggedAnswer(
            response_id=rid, key_id="k1", route="chat", model_name="nightshift-llm", model_version=3,
            model_role="champion", run_id=None, dataset_tag=None, request=[{"role": "user", "content": question}],
            answer=["A first answer that the rater did not like."] if corrected else [answer], finish="stop",
            prompt_tokens=10, completion_tokens=20, seconds=0.3, created_at=datetime.now(UTC) - timedelta(hours=2)))
    request_log.stop()
    for rid, (_, answer) in answers.items():
        request_log.add_feedback(rid, "k1", rating, answer if corrected else None, None)


def harvest(choice):
    with Approver("harvest_feedback", choice) as approver:
        dag_run, tasks = run(fresh("harvest_feedback"), {})
    assert approver.error is None, approver.error
    detail = approver.answered
    assert "candidate training documents" in detail["subject"], detail["subject"]
    assert "corrections written by raters" in detail["body"], detail["body"]
    return dag_run, tasks, approver


def corpus_rows(settings, tag):
    from nightshift.stores import dataset_repository

    path = dataset_repository(settings).fetch(dataset_repository(settings).get(tag), settings.home / "c.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_approved_feedback_reaches_the_next_corpus_and_rejected_feedback_never(home):
    log_and_rate(home, CORRECTIONS, -1, corrected=True)
    log_and_rate(home, RATED_WELL, 1, corrected=False)
    log_and_rate(home, RATED_BADLY, -1, corrected=False)

    dag_run, tasks, approver = harvest("Approve")
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    decided = tasks["apply_decision"].value
    assert decided["state"] == "approved" and decided["candidates"] == 4 and decided["corrections"] == 3
    assert "visits@example.org" not in approver.answered["body"]  # scrubbed when it was logged

    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    rows = corpus_rows(home, tasks["version_dataset"].value["tag"])
    feedback = {r["id"]: r for r in rows if r["id"].startswith("feedback/")}
    assert set(feedback) == {f"feedback/{rid}" for rid in (*CORRECTIONS, *RATED_WELL) if rid != "chatcmpl-g"}
    first = feedback["feedback/chatcmpl-a"]
    assert "ten in the morning" in first["text"] and "visits@example.org" not in first["text"]
    assert first["meta"]["feedback"]["model_version"] == 3 and first["meta"]["feedback"]["kind"] == "correction"
    assert first["meta"]["feedback"]["approved_by"]  # who approved it travels with it

    # Nothing new: the next harvest has nothing to decide. New ratings, rejected: they never reach a corpus.
    dag_run, tasks = run(fresh("harvest_feedback"), {})
    assert tasks["collect_candidates"].state == "skipped" and tasks["approve_batch"].state == "skipped"
    log_and_rate(home, {"chatcmpl-e": ("Do you sell gift cards?", "Gift cards are sold at the ticket desk in "
                                       "the main hall, in any amount from ten euros.")}, 1, corrected=False)
    dag_run, tasks, _ = harvest("Reject")
    assert tasks["apply_decision"].value["state"] == "rejected"
    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success"
    assert not any(r["id"] == "feedback/chatcmpl-e" for r in corpus_rows(home, tasks["version_dataset"].value["tag"]))


def test_a_batch_nobody_answers_is_rejected_when_its_time_runs_out(home, tmp_path, monkeypatch):
    from nightshift.settings import CONFIG_DIR

    policy = (CONFIG_DIR / "monitoring.yaml").read_text().replace("response_timeout_hours: 168",
                                                                  "response_timeout_hours: 0.0005")
    assert "0.0005" in policy
    (tmp_path / "monitoring.yaml").write_text(policy)
    monkeypatch.setenv("NIGHTSHIFT_MONITORING_POLICY", str(tmp_path / "monitoring.yaml"))
    log_and_rate(home, RATED_WELL, 1, corrected=False)
    with TimeoutSweeper() as sweeper:  # about two seconds after the form appears, its default answers it
        dag_run, tasks = run(fresh("harvest_feedback"), {})
    assert sweeper.error is None, sweeper.error
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    decided = tasks["apply_decision"].value
    assert decided["state"] == "rejected" and decided["by"] == "timeout"
