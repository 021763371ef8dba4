"""One case per DAG file: it imports cleanly and cheaply, and is configured as the house style asks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DAG_FILES = sorted((REPO / "dags").glob("*.py"))
PROBE = Path(__file__).with_name("parse_probe.py")
PARSE_BUDGET_S = 5.0


@pytest.fixture(scope="module", params=DAG_FILES, ids=lambda p: p.name)
def parsed(request, airflow_db):
    proc = subprocess.run([sys.executable, str(PROBE), str(request.param)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, json.loads(proc.stdout.strip().splitlines()[-1])


def test_there_are_dags():
    assert {p.stem for p in DAG_FILES} >= {"ingest_corpus", "finetune_model"}


def test_imports_without_errors_and_dag_id_is_the_file_stem(parsed):
    path, report = parsed
    assert report["import_errors"] == {}
    assert list(report["dags"]) == [path.stem]


def test_no_heavy_imports_and_no_lookups_at_parse_time(parsed):
    _, report = parsed
    assert report["heavy"] == [], f"imported at parse time: {report['heavy']}"
    assert report["seconds"] < PARSE_BUDGET_S


def test_house_style(parsed):
    path, report = parsed
    dag = report["dags"][path.stem]
    assert "nightshift" in dag["tags"] and len(dag["tags"]) >= 2
    assert dag["doc_md"] and dag["catchup"] is False
    assert dag["min_retries"] >= 2
    assert dag["owners"] == ["nightshift"]
    assert dag["undescribed_params"] == []
    assert dag["failure_callbacks"], "every task must alert on failure"
    assert dag["untimed_tasks"] == [], "every task needs an execution_timeout"
