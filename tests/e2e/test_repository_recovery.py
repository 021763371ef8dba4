"""A real ingest_corpus run on a data repository that a raced first night left broken: it versions anyway.

Two processes creating the first version together used to commit a corpus file into git itself inside the
"Initialise data repository" commit, after which every version failed. The night repairs the repository
under the version lock and creates its version; git's tree ends clean, with the corpus in DVC only.
"""

import json
import subprocess

import pytest

from cli_helpers import files_night, fresh, run
from nightshift.settings import SAMPLE_STORE

pytestmark = pytest.mark.e2e


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_a_night_versions_into_a_repository_left_half_initialised(tmp_path, monkeypatch, airflow_db):
    from dvc.repo import Repo

    from nightshift.stores import dataset_repository

    settings = files_night(tmp_path, monkeypatch, "samples", SAMPLE_STORE)
    repo = dataset_repository(settings)

    # What the race left: DVC initialised without its remote, and a corpus copy committed into git.
    repo.root.mkdir(parents=True)
    git(repo.root, "init", "--quiet", "--initial-branch=main")
    Repo.init(str(repo.root)).close()
    (repo.root / "corpus").mkdir()
    (repo.root / repo.data_path).write_text('{"id": "a stray copy"}\n')
    git(repo.root, "add", "-A")
    git(repo.root, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "--quiet", "-m",
        "Initialise data repository")

    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    version = tasks["version_dataset"].value
    assert version["tag"] == "corpus-v0001" and version["documents"] > 0
    assert repo.versions() == ["corpus-v0001"]
    assert git(repo.root, "status", "--porcelain") == ""
    assert repo.data_path not in git(repo.root, "ls-files").split()
    fetched = repo.fetch(repo.get("corpus-v0001"), tmp_path / "versioned.jsonl").read_text()
    assert len(fetched.splitlines()) == version["documents"]
    assert all(json.loads(line)["id"].startswith("samples/") for line in fetched.splitlines())
    assert repo.remote_has(repo.get("corpus-v0001"))
