"""Checks outside monitor_model as incidents: a nightly corpus that drifted, a candidate the gate rejected.

Each is a check with a fingerprint (DAG, check, subject) in the incident book (alerts/incidents.py): its alert is
sent when it starts failing, again only after monitoring.yaml's ``incidents.repeat_hours`` while it keeps failing,
and a ``resolved:`` alert follows the first run where it passes. A retried task sends nothing twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import timedelta

from nightshift.alerts.channels import Alert
from nightshift.alerts.incidents import CheckResult, IncidentBook
from nightshift.settings import Settings

log = logging.getLogger(__name__)


def repeat_hours(settings: Settings) -> float:
    """Return monitoring.yaml's ``incidents.repeat_hours``; the default when the file is broken (monitor_model
    fails on it and says what is wrong; a night's data must not wait for it)."""
    from nightshift.monitoring.policy import Incidents, MonitoringPolicy

    try:
        return MonitoringPolicy.load(settings.monitoring_policy).incidents.repeat_hours
    except (ValueError, OSError) as exc:  # broken, missing or not a file
        log.warning("monitoring.yaml cannot be read (%s): incidents repeat after the default %s hours", exc,
                    Incidents().repeat_hours)
        return Incidents().repeat_hours


def as_incident(settings: Settings, check: str, subject: str, alert: Alert | None, passing: Alert,
                evaluation: str, send: Callable[[Alert], None]) -> str:
    """Record one outcome of ``check`` about ``subject``: failing with ``alert``, or passing (``alert`` None);
    send what the incident book decides, as ``alert`` (opened, or a reminder) or as ``passing`` retitled
    ``resolved: ...``. Return what was sent (``opened``, ``repeat``, ``resolved``) or ``""``.

    ``passing`` carries the run's place (DAG, run, task, report) for a resolved message; ``evaluation`` is the
    DAG run's task key, the same on a retry."""
    shown = alert or passing
    result = CheckResult(shown.dag_id, check, subject, alert is not None, shown.title, shown.message,
                         shown.severity, dict(shown.details))
    book = IncidentBook(settings.incidents_url, timedelta(hours=repeat_hours(settings)))
    try:
        notice = book.observe(result, evaluation)
        if notice is None:
            if alert is not None:
                print(f"{check} {subject}: still failing, already announced (incident open since earlier)")
            return ""
        if notice.kind == "resolved":
            out = dataclasses.replace(passing, title=notice.title, message=notice.message, severity="info")
        else:
            out = dataclasses.replace(shown, title=notice.title, message=notice.message or shown.message)
        send(dataclasses.replace(out, details={**out.details, "incident": notice.fingerprint, "kind": notice.kind}))
        book.delivered(notice.fingerprint, evaluation)
        return notice.kind
    finally:
        book.engine.dispose()
