"""Run a DAG with dag.test() and read back each task's state and return value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TaskResult:
    state: str
    seconds: float
    value: Any


def run(dag, conf: dict[str, Any]):
    """Run a DAG in-process; return the DagRun and ``{task_id: TaskResult}``."""
    from nightshift.cli import task_results

    dag_run = dag.test(run_conf=conf)
    results = {task_id: TaskResult(*result) for task_id, result in task_results(dag_run).items()}
    return dag_run, results
