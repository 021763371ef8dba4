"""Pieces every nightshift DAG shares: default arguments, the corpus Asset, the run folder of a task."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from nightshift.airflow.notifiers import AlertNotifier
from nightshift.provenance import safe_name
from nightshift.settings import Settings, load_settings

CORPUS_ASSET = Asset("nightshift://datasets/corpus", extra={"description": "versioned training corpus (DVC)"})
CANDIDATE_ASSET = Asset("nightshift://models/candidate", extra={
    "description": "a gated model version exposed as the registry's candidate, to be rolled out"})
CHAMPION_ASSET = Asset("nightshift://models/champion", extra={
    "description": "the model version in production, and the dataset version it was trained on"})

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "nightshift",
    "retries": 2,
    "retry_delay": timedelta(seconds=load_settings().retry_delay_s),
    # A hung task must end (and alert) instead of holding its pool slot and the DAG's only active run.
    "execution_timeout": timedelta(seconds=load_settings().task_timeout_s),
    "on_failure_callback": AlertNotifier(),
}


class UpstreamFailed(AirflowFailException):
    """A task that cannot run because an upstream task failed (and already alerted): fail without a second alert."""


def run_report(settings: Settings, context: Any):
    """Return the report folder of the current DAG run (a nightshift.reports.publish.RunRef)."""
    from nightshift.reports.publish import RunRef

    dag_run = context["dag_run"]
    return RunRef(settings, dag_run.dag_id, dag_run.run_id)


def run_dir(settings: Settings, context: Any) -> Path:
    """Return (and create) the work folder of the current DAG run."""
    dag_run = context["dag_run"]
    path = settings.work_dir / dag_run.dag_id / safe_name(dag_run.run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def triggered_by(context: Any) -> str:
    """Return who started the DAG run: the user who triggered it, else ``schedule`` (or the run type)."""
    dag_run = context["dag_run"]
    user = getattr(dag_run, "triggering_user_name", None)
    if user:
        return str(user)[:200]
    run_type = str(getattr(dag_run, "run_type", "") or "")
    return "schedule" if "scheduled" in run_type or "asset" in run_type else (run_type.lower() or "unknown")
