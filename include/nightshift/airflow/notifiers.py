"""Airflow notifier that alerts a person through the channel an Airflow connection describes.

The connection (``nightshift_alerts`` by default, defined in airflow_settings.yaml) decides the channel:
``fs`` appends to an alerts file, ``smtp`` sends mail through Airflow's SMTP provider (nightshift.airflow.mail),
``http`` posts to a Slack or Teams webhook.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from airflow.sdk import BaseNotifier

from nightshift.airflow.connections import get_connection, in_task
from nightshift.alerts.channels import Alert, channel_for
from nightshift.settings import load_settings

log = logging.getLogger(__name__)

REPORTED_DAGS = ("ingest_corpus", "finetune_model")


def send_alert(alert: Alert, conn_id: str | None = None) -> None:
    """Deliver an alert through the channel of an Airflow connection, looked up now (never at parse time).

    The Airflow Variable ``nightshift_environment`` (e.g. ``local``, ``prod``) prefixes the title, so people
    who receive alerts from several installations see at once which one is calling.
    """
    settings = load_settings()
    environment = _environment()
    if environment:
        alert = dataclasses.replace(alert, title=f"[{environment}] {alert.title}")
    conn_id = conn_id or settings.alert_conn_id
    conn = get_connection(conn_id)
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")
    if (conn.conn_type or "").lower() in ("smtp", "email"):
        from nightshift.airflow.mail import ProviderMail

        channel = ProviderMail.of(conn, conn_id)  # Airflow's SMTP provider
    else:
        channel = channel_for(
            conn.conn_type, conn.host, conn.port, conn.login, conn.password, conn.schema, extra, settings.home
        )
    channel.deliver(alert)
    log.info("alert sent via %s: %s", type(channel).__name__, alert.title)
    from nightshift.reports.publish import record_alert

    record_alert(settings, {"title": alert.title, "severity": alert.severity, "dag_id": alert.dag_id,
                            "run_id": alert.run_id, "task_id": alert.task_id, "created_at": alert.created_at,
                            "report": _report_path(alert)})


def _report_path(alert: Alert) -> str:
    from nightshift.reports.store import ReportStore

    return ReportStore.run_path(alert.dag_id, alert.run_id) if alert.report_url and alert.run_id else ""


def report_url_for(dag_id: str, run_id: str) -> str:
    """Return the report page URL of a nightshift DAG run ('' for DAGs without one)."""
    if not run_id or dag_id not in REPORTED_DAGS:
        return ""
    from nightshift.reports.publish import run_report_url

    return run_report_url(load_settings(), dag_id, run_id)


def _environment() -> str | None:
    if in_task():
        from airflow.sdk import Variable

        return Variable.get("nightshift_environment", default=None)
    from airflow.models.variable import Variable as StoredVariable

    return StoredVariable.get("nightshift_environment", default_var=None)


def alert_sender(source: str, conn_id: str | None = None):
    """Return ``send(title, message, severity)`` for processes outside Airflow tasks (the endpoint)."""

    def send(title: str, message: str, severity: str = "error") -> None:
        send_alert(Alert(title=title, message=message, severity=severity, task_id=source), conn_id)

    return send


class AlertNotifier(BaseNotifier):
    """Send an alert about a failed task or run; use as ``on_failure_callback``."""

    template_fields = ("title", "message")

    def __init__(self, conn_id: str | None = None, title: str | None = None, message: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.title = title
        self.message = message

    def notify(self, context: Any) -> None:
        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        dag_id = getattr(dag_run, "dag_id", "") or getattr(ti, "dag_id", "")
        task_id = getattr(ti, "task_id", "")
        exception = context.get("exception")
        if type(exception).__name__ == "UpstreamFailed":  # its cause has alerted already
            log.info("not alerting: %s", exception)
            return
        title = self.title or (f"{dag_id}.{task_id} failed" if task_id else f"{dag_id} failed")
        message = self.message or (f"{type(exception).__name__}: {exception}" if exception else "see the task log")
        run_id = getattr(dag_run, "run_id", "") or ""
        alert = Alert(
            title=title,
            message=message,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            link=getattr(ti, "log_url", "") or "",
            report_url=report_url_for(dag_id, run_id),
            details={"try_number": getattr(ti, "try_number", None)},
        )
        send_alert(alert, self.conn_id)
