"""A real ingest_corpus run over a folder holding every planted problem, a UTF-16 file and a 60 MB dump.

The versioned corpus holds no planted secret, the counts in prep.json and in the version's meta.json match
what was planted, the UTF-16 file is read, and the dump is dropped with its reason while the night goes on.
"""

import json
import random

import pytest
import yaml

from cli_helpers import fresh, run
from nightshift.prep.recipe import DEFAULT_RECIPE
from planted import EVAL_ITEMS, planted_night, prose

pytestmark = pytest.mark.e2e


def test_a_night_of_planted_problems_is_versioned_clean_and_counted(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    docs, expected, pii, secrets = planted_night(seed=3)
    store = tmp_path / "store"
    for doc in docs:
        path = store / (doc["id"] if doc["format"] != "html" or doc["id"].endswith(".html") else doc["id"] + ".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc["content"], encoding="utf-8")
    rng = random.Random(9)
    utf16 = prose(rng)
    (store / "windows").mkdir()
    (store / "windows" / "notes.txt").write_bytes(utf16.encode("utf-16"))
    dump_line = "The night sky over the ridge is dark and the dome is open to every visitor. "
    (store / "dump.txt").write_text(dump_line * (60_000_000 // len(dump_line)))
    expected["limits", "raw_too_long"] += 1  # the 60 MB dump, beside the planted 1.3 MB one

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(i) + "\n" for i in EVAL_ITEMS))
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe.pop("default_profile"), recipe.pop("profiles", None)
    # The planted problems are web prose's: this night runs the web profile's steps, inline in the recipe.
    recipe["steps"] = yaml.safe_load((DEFAULT_RECIPE.parent / "prep" / "web.yaml").read_text())["steps"]
    recipe["limits"]["max_raw_chars"] = 1_000_000
    for step in recipe["steps"]:
        if "decontaminate" in step:
            step["decontaminate"] = {"sets": {"heldout": str(heldout)}, "action": "drop"}
    (tmp_path / "prep.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(
        {"sources": [{"name": "planted", "kind": "files", "path": str(store)}]}))
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_SOURCE_ROOTS", str(store))
    monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(tmp_path / "sources.yaml"))
    monkeypatch.setenv("NIGHTSHIFT_PREP_RECIPE", str(tmp_path / "prep.yaml"))
    settings = load_settings()
    dataset_repository(settings).ensure()

    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}

    version = tasks["version_dataset"].value
    corpus = dataset_repository(settings).fetch(
        dataset_repository(settings).get(version["tag"]), tmp_path / "versioned.jsonl").read_text()
    assert not [s for s in secrets if s in corpus]
    ids = [json.loads(line)["id"] for line in corpus.splitlines()]
    assert "planted/windows/notes.txt" in ids
    assert json.loads(corpus.splitlines()[ids.index("planted/windows/notes.txt")])["text"] == utf16.strip()

    report = json.loads(next((settings.work_dir / "ingest_corpus").glob("*/prep.json")).read_text())
    counted = {(s["step"], reason): n for s in report["steps"] for reason, n in s["dropped"].items()}
    assert counted == dict(expected)
    assert report["pii"] == dict(pii)
    assert "planted/dump.txt" in report["steps"][0]["examples"]["raw_too_long"]

    meta = json.loads(dataset_repository(settings)._git("show", f"{version['rev']}:corpus/meta.json"))
    assert meta["prep"]["pii"] == dict(pii)
    assert meta["prep"]["documents_out"] == version["documents"] == len(ids)
    assert meta["prep"]["contamination"]["heldout"]["documents"] == 2
    assert meta["prep"]["dropped"]["near_dedup"] == {"near_duplicate": 4}
    assert tasks["validate_corpus"].state == "success"
