"""Celery settings of nightshift's workers (``[celery] celery_config_options``): Airflow's defaults, plus the heavy
libraries the tasks import, loaded once in each worker process before it forks a task.

Airflow's Celery worker forks every task from its pool process; a task that imports torch, transformers, DVC,
MLflow or Great Expectations inside its body (as the DAGs do, to keep parsing light) pays for the import in every
fork unless the pool process already holds them. Loaded at ``worker_process_init``, they are shared by every fork;
the scheduler and API server, which read this module too, import none of them.
"""

from __future__ import annotations

import importlib
import logging
import time

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_process_init

log = logging.getLogger(__name__)

PRELOAD = ("torch", "transformers", "dvc.repo", "mlflow", "great_expectations", "whylogs", "sklearn.linear_model",
           "nightshift.pipelines.ingest", "nightshift.pipelines.finetune_tasks")
"""Modules the DAGs' tasks import in their bodies; a missing one is skipped (a lighter image may lack it)."""

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@worker_process_init.connect
def preload(**_kwargs) -> None:
    """Import PRELOAD in this worker process, once."""
    started = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("not preloading %s: %s", name, exc)
    log.info("preloaded %d modules in %.1f s", len(PRELOAD), time.monotonic() - started)
