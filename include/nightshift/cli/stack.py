"""Airflow as a deployment runs it, for the production profile: its metadata DB on PostgreSQL, the API server,
scheduler, DAG processor and triggerer as processes of their own, and Celery workers taking tasks from Redis;
``production-local`` first starts the engines themselves on 127.0.0.1 (nightshift.engines).

``nightshift up`` supervises this stack until stopped; ``nightshift cycle`` starts it, runs one cycle through
the scheduler and the workers, and stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from nightshift.cli.tools import tool_path
from nightshift.settings import Settings, load_settings

log = logging.getLogger("nightshift")

DEFAULT_WORKERS = 2
"""Celery workers ``nightshift up`` starts on the production-local profile (NIGHTSHIFT_CELERY_WORKERS)."""


def celery_workers() -> int:
    raw = os.environ.get("NIGHTSHIFT_CELERY_WORKERS", str(DEFAULT_WORKERS))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 64:
        raise ValueError(f"NIGHTSHIFT_CELERY_WORKERS must be a number from 1 to 64, got {raw!r}")
    return int(raw)


@contextlib.contextmanager
def engines_for(settings: Settings) -> Iterator[tuple[Settings, frozenset[int]]]:
    """Start the local engines when the profile asks for them and export their settings; yield the settings this
    process now runs with and the engines' processes (which a supervisor must leave to this block to stop)."""
    if settings.profile != "production-local":
        yield settings, frozenset()
        return
    from nightshift.engines import LocalEngines

    with LocalEngines(settings.home / "engines") as engines:
        saved = {key: os.environ.get(key) for key in engines.environment()}
        os.environ.update(engines.environment())
        try:
            yield load_settings(), engines.pids()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def prepare_metadata(settings: Settings) -> None:
    """Migrate Airflow's metadata DB and apply airflow_settings.yaml (what `nightshift setup` does on one machine)."""
    from nightshift.airflow.settings_file import apply_settings_file
    from nightshift.settings import repo_root
    from nightshift.stores import dataset_repository

    subprocess.run([tool_path("airflow"), "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL)
    root = repo_root()
    if root:
        applied = apply_settings_file(root / "airflow_settings.yaml")
        log.info("airflow_settings.yaml: %d changes", applied.changed)
    dataset_repository(settings).ensure()


def airflow_services(env: dict[str, str], workers: int, log_dir: Path | None = None):
    """Return Airflow's components as supervised services: each a process of its own, as a deployment runs them
    (their output in ``log_dir/<name>.log`` when given)."""
    from nightshift.supervisor import Service

    airflow = tool_path("airflow")
    commands = {"api-server": [airflow, "api-server"], "scheduler": [airflow, "scheduler"],
                "dag-processor": [airflow, "dag-processor"], "triggerer": [airflow, "triggerer"]}
    for n in range(1, workers + 1):
        # --skip-serve-logs: the workers share this machine's log folder, which the API server reads directly
        # (one log server per machine would do; a second one on the same port could not start).
        commands[f"celery-worker-{n}"] = [airflow, "celery", "worker", "--concurrency", "1",
                                          "--celery-hostname", f"worker{n}@%h", "--skip-serve-logs"]
    return [Service(name, argv, env, log=log_dir / f"{name}.log" if log_dir else None)
            for name, argv in commands.items()]


@contextlib.contextmanager
def running_stack(services, spare: frozenset[int]) -> Iterator[None]:
    """Run supervised services in a background thread until the block ends, then stop every process they started."""
    from nightshift.supervisor import Supervisor

    supervisor = Supervisor(services, handle_signals=False, spare=spare)
    thread = threading.Thread(target=supervisor.run, name="stack", daemon=True)
    thread.start()
    try:
        yield
    finally:
        supervisor.request_stop()
        thread.join(timeout=120)


def python_env() -> dict[str, str]:
    """Return this process's environment with its Python's scripts first on PATH (Airflow starts `airflow ...`)."""
    env = os.environ.copy()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
