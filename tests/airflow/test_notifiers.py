import json
import re
from types import SimpleNamespace

import pytest

from helpers import SmtpSink, WebhookSink
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


def test_mail_goes_through_airflows_smtp_provider_to_a_real_server(airflow_db, monkeypatch):
    from nightshift.airflow.notifiers import send_alert
    from nightshift.alerts.channels import Alert

    alert = Alert(title="ingest_corpus.validate_corpus failed\r\nBcc: someone@example.net " + "x" * 3000,
                  message="2 of 6 expectations failed {{ 7 * 7 }}",
                  dag_id="ingest_corpus", task_id="validate_corpus", details={"failed": 2})
    with SmtpSink() as sink:
        monkeypatch.setenv("AIRFLOW_CONN_OPS_MAIL", sink.connection("oncall@example.com"))
        send_alert(alert, "ops_mail")
    (mail,) = sink.messages
    assert mail["To"] == "oncall@example.com" and mail["From"] == "nightshift@example.com"
    assert "ingest_corpus.validate_corpus failed Bcc: someone" in mail["Subject"]
    assert mail.get_all("Bcc") is None and len(mail["Subject"]) <= 200  # one line, bounded: no header of its own
    text = SmtpSink.text(mail)
    assert "2 of 6 expectations failed {{ 7 * 7 }}" in text and "49" not in text  # no template is evaluated


@pytest.mark.parametrize(("extra", "says"), [
    ({"to": ["a@example.com"], "from": "ns@example.com"}, "extra ['from'] is not read any more"),
    ({"to": ["a@example.com"], "starttls": True}, "disable_tls: false (STARTTLS)"),
    ({}, "needs a host and extra.to"),
])
def test_a_mail_connection_in_another_vocabulary_says_what_to_write(airflow_db, monkeypatch, extra, says):
    from nightshift.airflow.notifiers import send_alert
    from nightshift.alerts.channels import Alert

    monkeypatch.setenv("AIRFLOW_CONN_OPS_MAIL", json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "extra": extra}))
    with pytest.raises(ValueError, match=re.escape(says)):
        send_alert(Alert(title="t", message="m"), "ops_mail")
