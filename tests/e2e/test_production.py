"""The production profile on this machine, as `NIGHTSHIFT_PROFILE=production-local nightshift up` runs it: Airflow's
metadata on PostgreSQL, its API server, scheduler, DAG processor and triggerer as processes of their own, two
Celery workers taking tasks from Redis, MLflow as a tracking server with its artifacts in S3 (moto's server), the
DVC remote in the same bucket, OpenLineage events in a file; all real, on 127.0.0.1.

- a whole cycle (ingest_corpus, then finetune_model on its version) through the scheduler and the workers: the
  version and the checkpoint land in S3, the champion in the MLflow server, every task ran on a Celery worker,
  the lineage reads source -> corpus-v1 -> model v1 -> champion, and the endpoint serves it;
- twenty runs queued at once on the two workers each version a corpus: twenty versions, none lost or doubled;
- SIGTERM stops every process, the engines too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from conftest import TESTS, free_port
from helpers import marked, stop_supervisor, wait_for
from nightshift.environment import runtime_env
from nightshift.settings import SAMPLE_STORE, load_settings

pytestmark = pytest.mark.e2e

NIGHTSHIFT = [sys.executable, "-m", "nightshift.cli"]
LOAD_RUNS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make engines installs Debian's)")
    tmp = tmp_path_factory.mktemp("production")
    home, store = tmp / "home", tmp / "store"
    shutil.copytree(SAMPLE_STORE, store)
    shutil.copytree(tiny_model, home / "models" / tiny_model.name)
    marker = uuid.uuid4().hex
    api, serve = free_port(), free_port()
    bundles = [{"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {}},
               {"name": "load", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(TESTS / "e2e" / "load_dags")}}]
    env = {k: v for k, v in os.environ.items() if k not in runtime_env(load_settings())}  # a new installation
    env.update({
        "NIGHTSHIFT_HOME": str(home), "NIGHTSHIFT_PROFILE": "production-local", "NS_TEST_MARKER": marker,
        "NIGHTSHIFT_SOURCE_ROOTS": str(store), "NIGHTSHIFT_CELERY_WORKERS": "2",
        "AIRFLOW__API__PORT": str(api),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # Only the runs the tests trigger: no nightly run, no asset-triggered one beside them.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
    })
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([*NIGHTSHIFT, "up", "--serve-port", str(serve)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{api}"
    try:
        def healthy():
            assert up.poll() is None, (tmp / "up.log").read_text()[-3000:]
            return httpx.get(f"{base}/api/v2/monitor/health").json()["scheduler"]["status"] == "healthy"

        wait_for(healthy, 240, "Airflow on the production profile to be healthy", every=1)
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()
        rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=30)
        endpoints = json.loads((home / "engines" / "endpoints.json").read_text())
        yield {"rest": rest, "home": home, "store": store, "up": up, "marker": marker, "log": tmp / "up.log",
               "serve": f"http://127.0.0.1:{serve}", "endpoints": endpoints, "model": tiny_model.name}
    finally:
        stop_supervisor(up, marker)


def trigger(rest: httpx.Client, dag_id: str, conf: dict) -> str:
    wait_for(lambda: rest.get(f"/api/v2/dags/{dag_id}").status_code == 200, 120, f"{dag_id} to be parsed", every=1)
    rest.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    made = rest.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
    made.raise_for_status()
    return made.json()["dag_run_id"]


def finished(rest: httpx.Client, dag_id: str, run_id: str, timeout: float) -> dict:
    def ended():
        run = rest.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()
        return run if run["state"] in ("success", "failed") else None

    return wait_for(ended, timeout, f"{dag_id} {run_id} to end", every=2)


def returned(rest: httpx.Client, dag_id: str, run_id: str, task_id: str):
    entry = rest.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/"
                     "return_value", params={"deserialize": True, "stringify": False})
    entry.raise_for_status()
    return entry.json()["value"]


def s3(endpoints):
    import boto3

    from nightshift.engines import ACCESS_KEY, REGION, SECRET_KEY

    return boto3.client("s3", endpoint_url=endpoints["s3"], aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION)


def keys(endpoints, prefix: str) -> list[str]:
    listed = s3(endpoints).list_objects_v2(Bucket=endpoints["bucket"], Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def airflow_db(endpoints):
    import sqlalchemy as sa

    return sa.create_engine(endpoints["postgres"].replace("/postgres?", "/airflow?"))


def test_a_cycle_runs_on_postgresql_celery_mlflow_server_and_s3_with_lineage(stack):
    import sqlalchemy as sa
    from mlflow import MlflowClient
    from openai import OpenAI

    from nightshift.airflow.lineage import read_events

    rest, endpoints = stack["rest"], stack["endpoints"]
    ingest = trigger(rest, "ingest_corpus", {"source": str(stack["store"])})
    assert finished(rest, "ingest_corpus", ingest, 600)["state"] == "success"
    dataset = returned(rest, "ingest_corpus", ingest, "version_dataset")
    assert dataset["tag"] == "corpus-v0001"
    assert f"dvc/files/md5/{dataset['md5'][:2]}/{dataset['md5'][2:]}" in keys(endpoints, "dvc/")
    index = returned(rest, "ingest_corpus", ingest, "index_corpus")  # the production engine: pgvector with HNSW
    assert index["engine"] == "pgvector" and index["kind"] == "hnsw" and index["chunks"] >= dataset["documents"]

    finetune = trigger(rest, "finetune_model", {"dataset_version": dataset["tag"], "base_model": stack["model"],
                                                "recipe": "tiny"})
    assert finished(rest, "finetune_model", finetune, 900)["state"] == "success"
    client = MlflowClient(tracking_uri=endpoints["mlflow"], registry_uri=endpoints["mlflow"])
    champion = client.get_model_version_by_alias("nightshift-llm", "champion")
    assert champion.version == "1" and champion.source.startswith("runs:/")
    stored = keys(endpoints, "mlflow/")
    assert any(k.endswith("checkpoint/model.safetensors") for k in stored)
    assert any(k.endswith("checkpoint/MANIFEST.json") for k in stored)

    # Every task instance that ran was sent through Celery: the result backend on PostgreSQL holds one result each.
    # A task reports its own state to Airflow before its Celery worker stores the result: the last one may lag.
    def counts() -> tuple[int, int]:
        with airflow_db(endpoints).connect() as conn:
            ran = conn.scalar(sa.text("SELECT count(*) FROM task_instance WHERE state = 'success' AND dag_id IN "
                                      "('ingest_corpus', 'finetune_model') AND start_date IS NOT NULL "
                                      "AND operator NOT IN ('EmptyOperator')"))
            return ran, conn.scalar(sa.text("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"))

    ran, results = wait_for(lambda: (c := counts())[1] >= c[0] and c, 30, "Celery to store every result")
    assert ran > 20 and results >= ran

    # Lineage: the provider's events, with the inputs and outputs the tasks' records name.
    edges = {(i["name"], o["name"]) for e in read_events(stack["home"]) if e.get("eventType") == "COMPLETE"
             for i in e.get("inputs", []) for o in e.get("outputs", [])}
    sources = {a for a, b in edges if b == "datasets/corpus-v0001"}
    assert sources and all(s.startswith("sources/") for s in sources)
    assert ("datasets/corpus-v0001", "models/nightshift-llm/v1") in edges
    assert ("models/nightshift-llm/v1", "models/nightshift-llm@champion") in edges
    text = (stack["home"] / "lineage" / "events.jsonl").read_text()
    assert str(stack["store"]) not in text and '"source": "<redacted>"' in text  # a Param's value stays out
    jobs = {e["job"]["name"] for e in read_events(stack["home"])}
    assert {"ingest_corpus.version_dataset", "finetune_model.train_local", "finetune_model.promote_candidate"} <= jobs

    # The endpoint serves the champion it downloaded from the tracking server's S3.
    key = (stack["home"] / "serving" / "local.key").read_text().strip()
    wait_for(lambda: httpx.get(f"{stack['serve']}/healthz").status_code == 200, 180, "the endpoint to serve v1")
    answer = OpenAI(base_url=f"{stack['serve']}/v1", api_key=key).chat.completions.with_raw_response.create(
        model="nightshift-llm", messages=[{"role": "user", "content": "When does the gallery open?"}], max_tokens=4)
    assert answer.headers["x-nightshift-model-version"] == "1"


def test_twenty_runs_queued_at_once_on_two_celery_workers_version_each_corpus_once(stack):
    rest, home = stack["rest"], stack["home"]
    before = len(keys(stack["endpoints"], "dvc/"))
    runs = {trigger(rest, "version_load", {"n": n}): n for n in range(LOAD_RUNS)}
    for run_id in runs:
        assert finished(rest, "version_load", run_id, 600)["state"] == "success"
    made = [returned(rest, "version_load", run_id, "version") for run_id in runs]
    assert sorted(m["n"] for m in made) == list(range(LOAD_RUNS))
    tags = sorted(m["tag"] for m in made)
    assert tags == [f"corpus-v{n:04d}" for n in range(2, LOAD_RUNS + 2)]  # after the cycle's corpus-v0001
    assert len({m["md5"] for m in made}) == LOAD_RUNS and all(m["created"] for m in made)
    assert len(keys(stack["endpoints"], "dvc/")) == before + LOAD_RUNS
    logs = [(home / "logs" / "stack" / f"celery-worker-{n}.log").read_text() for n in (1, 2)]
    took = [log.count("succeeded in") for log in logs]
    assert all(took), took  # both workers took tasks


def test_sigterm_stops_every_process_and_the_engines(stack):
    import psutil

    pids = [int(pid) for pid in json.loads((stack["home"] / "engines" / "pids.json").read_text())]
    postmaster = int((stack["home"] / "engines" / "postgres" / "postmaster.pid").read_text().split()[0])
    stack["up"].terminate()
    assert stack["up"].wait(timeout=120) == 0
    wait_for(lambda: marked(stack["marker"]) == [], 30, "every process of the stack to be gone")
    assert not [pid for pid in [*pids, postmaster] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in Path(stack["log"]).read_text()
