"""A real ingest_corpus night over an export whose ids and folder names hold e-mail addresses and tokens.

Nothing personal leaves collection: not the versioned corpus, the DVC remote, the run folder's skipped and
dropped lists, the reports or the alerts. Every byte under the installation's home is searched.
"""

import json

import pytest

from cli_helpers import files_night, fresh, run

pytestmark = pytest.mark.e2e

EMAIL = "john.smith@example.org"
FOLDER_EMAIL = "maria.garcia@example.net"
ENCODED = "jane.doe%40example.com"
TOKEN = "ghp_" + "R8t" * 12
PLANTED = [EMAIL, FOLDER_EMAIL, ENCODED, TOKEN, "john.smith", "maria.garcia", "jane.doe", "R8tR8tR8t"]


def test_ids_urls_and_folder_names_reach_no_file_of_the_installation(tmp_path, monkeypatch, airflow_db):
    from nightshift.stores import dataset_repository

    store = tmp_path / "store"
    (store / "crm").mkdir(parents=True)
    records = [
        {"id": EMAIL, "text": "The dome opens at dusk on clear nights; the refractor is pointed by hand. " * 3},
        {"id": TOKEN, "text": "School groups book the planetarium show two weeks ahead of their visit. " * 3},
        {"id": f"https://crm.example/c?email={ENCODED}&token={TOKEN}", "text": "Too short"},  # dropped by prep
    ]
    (store / "crm" / "export.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (store / FOLDER_EMAIL).mkdir()
    (store / FOLDER_EMAIL / "notes.txt").write_text("Bring warm clothes: the terrace is cold after midnight. " * 3)
    (store / FOLDER_EMAIL / "scan.pdf").write_bytes(b"%PDF-1.4")  # skipped: unsupported extension
    monkeypatch.setenv("NIGHTSHIFT_SOURCE_ROOTS", str(store))
    settings = files_night(tmp_path, monkeypatch, "crm", store)
    dataset_repository(settings).ensure()

    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    assert tasks["version_dataset"].value["documents"] == 3
    merged = tasks["merge_sources"].value
    assert merged["sources"]["crm"]["skipped"] == 1

    run_dir = next((settings.work_dir / "ingest_corpus").glob("*/corpus.jsonl")).parent
    skipped = json.loads((run_dir / "skipped.json").read_text())
    assert len(skipped) == 2 and any("<SECRET>-" in s["location"] for s in skipped)  # the dropped record's id
    ids = [json.loads(line)["id"] for line in (run_dir / "corpus.jsonl").read_text().splitlines()]
    assert sum("<EMAIL>-" in i for i in ids) == 2 and sum("<SECRET>-" in i for i in ids) == 1

    files = [p for p in settings.home.rglob("*") if p.is_file()]
    assert any(p.is_relative_to(settings.dvc_remote) for p in files)  # the remote was written and is searched
    assert any(p.is_relative_to(settings.reports_dir) for p in files)
    leaks = {str(p.relative_to(settings.home)): v for p in files for v in PLANTED if v.encode() in p.read_bytes()}
    assert leaks == {}
