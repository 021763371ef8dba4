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


class Approver:
    """A person at the Airflow UI: waits for a run's approval form (a human-in-the-loop task of ``dag_id``) and
    answers it through the REST API, as the UI's Required Actions do. ``answered`` is the form it saw."""

    def __init__(self, dag_id: str, choice: str, params: dict[str, Any] | None = None) -> None:
        import threading

        self.dag_id, self.choice, self.params = dag_id, choice, params
        self.answered: dict[str, Any] | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Approver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(10)

    def _run(self) -> None:
        import time
        from urllib.parse import quote

        try:
            from airflow.api_fastapi.app import create_app
            from fastapi.testclient import TestClient

            client = TestClient(create_app(apps="core"))  # AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS: a token
            headers = {"Authorization": f"Bearer {client.get('/auth/token').json()['access_token']}"}
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                waiting = client.get(f"/api/v2/dags/{self.dag_id}/dagRuns/~/hitlDetails", headers=headers,
                                     params={"response_received": "false"}).json().get("hitl_details", [])
                if waiting:
                    detail = waiting[0]
                    ti = detail["task_instance"]
                    body = {"chosen_options": [self.choice], **({"params_input": self.params} if self.params else {})}
                    response = client.patch(
                        f"/api/v2/dags/{self.dag_id}/dagRuns/{quote(ti['dag_run_id'], safe='')}/taskInstances/"
                        f"{ti['task_id']}/{ti['map_index']}/hitlDetails", json=body, headers=headers)
                    if response.status_code != 200:
                        self.error = f"{response.status_code}: {response.text[:500]}"
                    self.answered = detail
                    return
                time.sleep(0.5)
            self.error = "no approval form appeared"
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)


class TimeoutSweeper:
    """The scheduler's sweep of human-in-the-loop tasks past their response_timeout, run every half second while
    a dag.test() run waits (dag.test has no scheduler of its own to do it)."""

    def __init__(self) -> None:
        import threading

        self.stop = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TimeoutSweeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        try:
            from airflow.jobs.job import Job
            from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

            runner = SchedulerJobRunner(job=Job(), executors=[])
            while not self.stop.wait(0.5):
                runner.check_awaiting_input_timeouts()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)
