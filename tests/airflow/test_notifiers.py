import json
from types import SimpleNamespace

from helpers import WebhookSink
from nightshift.airflow.notifiers import AlertNotifier


def test_failure_notifier_posts_what_failed_and_why(airflow_db, monkeypatch):
    context = {
        "ti": SimpleNamespace(task_id="train_local", dag_id="finetune_model", try_number=3,
                              log_url="http://localhost:8080/log"),
        "dag_run": SimpleNamespace(dag_id="finetune_model", run_id="scheduled__2026-11-30"),
        "exception": RuntimeError("trainer exited with code 1"),
    }
    with WebhookSink() as sink:
        monkeypatch.setenv("AIRFLOW_CONN_OPS_WEBHOOK", json.dumps({"conn_type": "http", "host": sink.url}))
        monkeypatch.setenv("AIRFLOW_VAR_NIGHTSHIFT_ENVIRONMENT", "staging")
        AlertNotifier(conn_id="ops_webhook").notify(context)
    text = sink.bodies[0]["text"]
    assert "[staging] finetune_model.train_local failed" in text
    assert "RuntimeError: trainer exited with code 1" in text
    assert "scheduled__2026-11-30" in text and "http://localhost:8080/log" in text


def test_processes_outside_tasks_alert_through_the_stored_connection(airflow_db):
    """The endpoint is no Airflow task: its alerts use the connection in the metadata DB (airflow_settings.yaml)."""
    from nightshift.airflow.notifiers import alert_sender

    alerts = airflow_db.home / "alerts" / "alerts.jsonl"
    before = alerts.read_text().count("\n") if alerts.is_file() else 0
    alert_sender("serving")("endpoint could not load nightshift-llm v7", "still serving v6", "error")
    lines = alerts.read_text().splitlines()
    assert len(lines) == before + 1
    alert = json.loads(lines[-1])
    assert alert["title"] == "[local] endpoint could not load nightshift-llm v7"
    assert alert["task_id"] == "serving" and alert["severity"] == "error"
