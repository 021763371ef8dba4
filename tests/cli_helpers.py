"""Parse a DAG file afresh and run it with dag.test(); read back each task's state and return value."""

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
    from nightshift.cli.cycle import task_results

    dag_run = dag.test(run_conf=conf)
    results = {task_id: TaskResult(*result) for task_id, result in task_results(dag_run).items()}
    return dag_run, results


def fresh(dag_id: str):
    """Return the DAG parsed anew from its file, as a scheduler would: runs share no DAG object state."""
    from airflow.dag_processing.dagbag import DagBag

    from conftest import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / f"{dag_id}.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def files_night(tmp_path, monkeypatch, name: str, path) -> Any:
    """Point ingest_corpus at one files source and the short prep recipe, with state under tmp_path; return the
    settings it will run with."""
    import yaml

    from conftest import REPO
    from nightshift.settings import load_settings

    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"sources": [{"name": name, "kind": "files",
                                                                         "path": str(path)}]}))
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(tmp_path / "sources.yaml"))
    monkeypatch.setenv("NIGHTSHIFT_PREP_RECIPE", str(REPO / "tests" / "e2e" / "prep_recipes" / "short.yaml"))
    return load_settings()
