"""Close the MLflow run of a DAG run that failed for good, so that no run stays RUNNING forever."""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)


class FailTrackingRun(BaseNotifier):
    """``on_failure_callback``: mark the DAG run's MLflow run FAILED (called after the last retry only)."""

    def __init__(self, experiment: str) -> None:
        super().__init__()
        self.experiment = experiment

    def notify(self, context: Any) -> None:
        from nightshift.settings import load_settings
        from nightshift.stores import registry_for

        dag_run = context.get("dag_run")
        if dag_run is None:
            return
        try:
            run = registry_for(load_settings()).find_run(self.experiment, f"{dag_run.dag_id}/{dag_run.run_id}")
            if run is not None and run.info.status == "RUNNING":
                registry_for(load_settings()).end_run(run.info.run_id, status="FAILED")
                log.info("marked MLflow run %s FAILED", run.info.run_id)
        except Exception:  # a callback must never hide the failure it reports
            log.exception("could not close the MLflow run of %s", dag_run.run_id)
