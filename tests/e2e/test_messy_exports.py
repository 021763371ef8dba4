"""A real ingest_corpus night over one messy JSONL export, the shipped shape of sources.yaml (one files source).

The export is larger than the whole-file limit of a single document (64 MiB): 100 good records, a few of them
holding raw U+2028 and U+0085 inside their text; one record with a lone surrogate escape; and sixteen records
over the per-record limit. The night succeeds and versions the 100 good documents; the other 17 are counted
skips with their reasons.
"""

import json
import random

import pytest

from cli_helpers import files_night, fresh, run
from planted import prose

pytestmark = pytest.mark.e2e


def test_one_bad_record_and_a_large_export_cost_only_those_records(tmp_path, monkeypatch, airflow_db):
    from nightshift.sources.document_store import MAX_FILE_BYTES, MAX_RECORD_BYTES, read_raw
    from nightshift.stores import dataset_repository

    rng = random.Random(20)
    good = {f"doc-{i}": prose(rng) for i in range(100)}
    for i in range(5):  # raw line and paragraph separators inside the JSON strings, as some exporters leave them
        good[f"doc-{i}"] = good[f"doc-{i}"].replace(". ", ".\u2028", 1)
        good[f"doc-{i + 5}"] = good[f"doc-{i + 5}"].replace(". ", ".\u0085", 1)
    huge = json.dumps({"id": "huge", "text": "x" * MAX_RECORD_BYTES}).encode() + b"\n"
    store = tmp_path / "store"
    store.mkdir()
    with (store / "crm-export.jsonl").open("wb") as fh:
        for i, (doc_id, text) in enumerate(good.items()):
            fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode() + b"\n")
            if i == 50:
                fh.write(b'{"id": "cut", "text": "A reply cut in the middle of an emoji \\ud83d by the exporter."}\n')
            if i % 6 == 0 and i < 96:
                fh.write(huge)
    assert (store / "crm-export.jsonl").stat().st_size > MAX_FILE_BYTES
    settings = files_night(tmp_path, monkeypatch, "crm", store)
    dataset_repository(settings).ensure()

    dag_run, tasks = run(fresh("ingest_corpus"), {})

    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    collected = tasks["merge_sources"].value["sources"]["crm"]
    assert collected["documents"] == 100
    assert collected["skip_reasons"] == {"record too large": 16, "not UTF-8 text": 1}
    assert tasks["version_dataset"].value["documents"] == 100
    raw_file = next((settings.work_dir / "ingest_corpus").glob("*/sources/crm/raw.jsonl"))
    raw = {d.id: d.content for d in read_raw(raw_file)}
    assert raw == {f"crm/crm-export.jsonl#{k}": v for k, v in good.items()}  # the separators kept, byte for byte
