"""Profiles, drift and report pages of real ingest_corpus runs (dag.test()): a corpus of much longer documents
drifts, the warning alert links to the run's page, and a blocking policy stops the night before versioning."""

import json
import random
import subprocess
import sys

import pytest

from cli_helpers import run
from conftest import REPO
from helpers import own_home
from nightshift.provenance import safe_name
from planted import prose

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def home(airflow_db, tmp_path_factory):
    """The module's own NIGHTSHIFT_HOME, so that its dataset versions are its own whatever ran before."""
    yield from own_home(tmp_path_factory, "reports-home")


@pytest.fixture(scope="module")
def ingest(home):
    from airflow.dag_processing.dagbag import DagBag

    from nightshift.stores import dataset_repository

    dataset_repository(home).ensure()

    def dag():
        bag = DagBag(dag_folder=str(REPO / "dags" / "ingest_corpus.py"))
        assert not bag.import_errors
        return bag.dags["ingest_corpus"]

    return dag


def store(root, seed, paragraphs):
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(40):
        (root / f"doc{i:02d}.md").write_text(prose(rng, paragraphs, 4))
    return root


def alerts(home):
    path = home.home / "alerts" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_drift_warns_with_the_report_link_and_blocks_only_when_the_policy_says(ingest, home, tmp_path,
                                                                              monkeypatch):
    from nightshift.stores import dataset_repository

    repo = dataset_repository(home)
    short, long = store(tmp_path / "short", 1, 2), store(tmp_path / "long", 2, 9)
    first, tasks = run(ingest(), {"source": str(short)})
    assert first.state == "success", {k: t.state for k, t in tasks.items()}
    short_tag = tasks["version_dataset"].value["tag"]
    before = len(alerts(home))

    second, tasks = run(ingest(), {"source": str(long)})
    assert second.state == "success"  # drift warns; the shipped policy does not block
    drift = tasks["profile_corpus"].value
    assert drift["status"] == "drift" and {"chars", "words"} <= set(drift["drifted"])
    assert drift["references"]["previous"] == short_tag
    [warning] = alerts(home)[before:]
    assert warning["severity"] == "warning" and "chars" in warning["title"]
    run_folder = home.reports_dir / "runs" / "ingest_corpus" / safe_name(second.run_id)
    assert warning["report_url"] == home.report_url(f"runs/ingest_corpus/{run_folder.name}/index.html")

    # The page, its charts and Data Docs are in the report folder; the profile is versioned with the corpus.
    page = (run_folder / "index.html").read_text()
    assert "drift-previous-chars.svg" in page and "charts/chars.svg" in page and "datadocs/validations" in page
    assert (run_folder / "charts" / "drift-previous-chars.svg").is_file()
    tag = tasks["version_dataset"].value["tag"]
    assert repo.read_companion(tag, "profile.bin") == (run_folder / "profile.bin").read_bytes()
    meta = json.loads(repo._git("show", f"{tag}:corpus/meta.json"))
    assert meta["drift"]["status"] == "drift" and "chars" in meta["drift"]["drifted"]
    overview = (home.reports_dir / "index.html").read_text()
    assert tag in overview and "corpus drift" in overview
    # Any version's profile comes back by its tag, from the command line too.
    shown = subprocess.run([sys.executable, "-m", "nightshift.cli", "profile", tag, "--out", str(tmp_path / "p.bin")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{tag}: {tasks['version_dataset'].value['documents']} documents" in shown.stdout and "chars" in shown.stdout
    assert (tmp_path / "p.bin").read_bytes() == repo.read_companion(tag, "profile.bin")

    # Blocking: the short documents again drift from the long ones, and the policy now fails the night.
    policy = tmp_path / "drift.yaml"
    policy.write_text((REPO / "include" / "configs" / "drift.yaml").read_text().replace("block: false", "block: true"))
    monkeypatch.setenv("NIGHTSHIFT_DRIFT_POLICY", str(policy))
    versions = repo.versions()
    third, tasks = run(ingest(), {"source": str(short)})
    assert third.state == "failed" and tasks["profile_corpus"].state == "failed"
    assert tasks["version_dataset"].state == "upstream_failed" and repo.versions() == versions
    blocked = alerts(home)[-1]
    assert blocked["severity"] == "error" and "profile_corpus" in blocked["title"]
    assert blocked["report_url"].endswith("/index.html") and "/nightshift/reports/runs/ingest_corpus/" in \
        blocked["report_url"]
