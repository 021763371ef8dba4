"""Pieces every nightshift DAG shares: default arguments, the corpus Asset, the run folder of a task."""

from __future__ import annotations

from contextlib import ContextDecorator
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from nightshift.airflow.notifiers import AlertNotifier
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


def current_run(settings: Settings, context: Any = None):
    """Return the DAG run a task belongs to as the pipelines see it (nightshift.pipelines.run.Run)."""
    from airflow.sdk import get_current_context

    from nightshift.pipelines.run import Run

    context = context if context is not None else get_current_context()
    dag_run = context["dag_run"]
    events = context.get("triggering_asset_events") or {}
    extras = tuple(dict(e.extra or {}) for found in events.values() for e in found)
    return Run(settings, dag_run.dag_id, dag_run.run_id, triggered_by(context), extras)


def run_report(settings: Settings, context: Any):
    """Return the report folder of the current DAG run (a nightshift.reports.publish.RunRef)."""
    return current_run(settings, context).report


def run_dir(settings: Settings, context: Any) -> Path:
    """Return (and create) the work folder of the current DAG run."""
    return current_run(settings, context).work_dir()


class fail_fast(ContextDecorator):  # noqa: N801 - used as a decorator and a ``with`` statement, like contextlib's
    """Turn errors that no retry can mend (a bad Param, a broken recipe or policy file, a refused request) into
    AirflowFailException: the task fails at once, with the message, and alerts once instead of after every retry.

    ``@fail_fast()`` under ``@task`` covers a whole task; ``with fail_fast(SomeError, prefix="source x: ")`` one
    call; the prefix and suffix say where the error came from or what to change. The default errors are those
    of a request or a config file: missing files, unknown names, bad values.
    """

    REQUEST_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, LookupError,
                                                       ValueError, TypeError)

    def __init__(self, *errors: type[BaseException], prefix: str = "", suffix: str = "") -> None:
        self.errors = errors or self.REQUEST_ERRORS
        self.prefix, self.suffix = prefix, suffix

    def __enter__(self) -> fail_fast:
        return self

    def __exit__(self, kind, exc, _tb) -> bool:
        if exc is not None and isinstance(exc, self.errors) and not isinstance(exc, AirflowFailException):
            raise AirflowFailException(f"{self.prefix}{exc}{self.suffix}") from exc
        return False


def triggered_by(context: Any) -> str:
    """Return who started the DAG run: the user who triggered it, else ``schedule`` (or the run type)."""
    dag_run = context["dag_run"]
    user = getattr(dag_run, "triggering_user_name", None)
    if user:
        return str(user)[:200]
    run_type = str(getattr(dag_run, "run_type", "") or "")
    return "schedule" if "scheduled" in run_type or "asset" in run_type else (run_type.lower() or "unknown")
