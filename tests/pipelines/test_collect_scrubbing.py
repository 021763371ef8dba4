"""collect_source scrubs ids, sources, meta values and skipped locations before anything is written."""

import json
import os
import re

from nightshift.pipelines.ingest import ID_KEY, collect_source

EMAIL = "john.smith@example.org"
FOLDER_EMAIL = "jane.doe@example.com"
TOKEN = "ghp_" + "Q7w" * 12


def _store(root):
    (root / "crm").mkdir(parents=True)
    records = [{"id": EMAIL, "text": "The dome opens at dusk."},
               {"id": f"{TOKEN}", "text": "School groups book ahead."},
               {"id": "plain-7", "text": "The refractor is old."}]
    (root / "crm" / "export.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / FOLDER_EMAIL).mkdir()
    (root / FOLDER_EMAIL / "notes.txt").write_text("Bring warm clothes.")
    (root / FOLDER_EMAIL / "photo.bin").write_bytes(b"\x00")
    return root


def test_ids_sources_and_skips_are_scrubbed_stable_unique_and_keyed(tmp_path):
    store = _store(tmp_path / "store")
    state = tmp_path / "state"
    spec = {"name": "crm", "kind": "files", "settings": {"path": str(store)}}
    report = collect_source(spec, tmp_path / "run1", state)
    assert report["documents"] == 4 and report["skipped"] == 1

    out = tmp_path / "run1" / "sources" / "crm"
    written = "".join(p.read_text() for p in out.iterdir())
    for planted in (EMAIL, FOLDER_EMAIL, TOKEN, "john.smith", "jane.doe"):
        assert planted not in written
    docs = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids) == 4
    assert "crm/crm/export.jsonl#plain-7" in ids
    assert any(re.fullmatch(r"crm/crm/export\.jsonl#<EMAIL>-[0-9a-f]{12}", i) for i in ids)
    assert any(re.fullmatch(r"crm/crm/export\.jsonl#<SECRET>-[0-9a-f]{12}", i) for i in ids)
    assert any(re.fullmatch(r"crm/<EMAIL>-[0-9a-f]{12}/notes\.txt", i) for i in ids)
    [skip] = json.loads((out / "skipped_collect.json").read_text())
    assert re.fullmatch(r"crm/<EMAIL>-[0-9a-f]{12}/photo\.bin", skip["location"])

    # The key is made once, private to the installation; the same night again gives the same ids.
    key = state / ID_KEY
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    collect_source(spec, tmp_path / "run2", state)
    again = [json.loads(line)["id"] for line in
             (tmp_path / "run2" / "sources" / "crm" / "raw.jsonl").read_text().splitlines()]
    assert again == ids
    # Another installation (another key) cannot match these ids by hashing a list of addresses.
    collect_source(spec, tmp_path / "run3", tmp_path / "other-state")
    other = [json.loads(line)["id"] for line in
             (tmp_path / "run3" / "sources" / "crm" / "raw.jsonl").read_text().splitlines()]
    assert [i for i in other if "<EMAIL>" in i] != [i for i in ids if "<EMAIL>" in i]


def test_meta_strings_and_urls_are_scrubbed_recursively():
    from nightshift.pipelines.ingest import _scrub_tree
    from nightshift.prep.pii import scrub_identifier

    meta = {"url": f"https://h.example/p?email=jane.doe%40example.com&token={TOKEN}", "status": 200,
            "nested": [{"owner": EMAIL}], "fetched_at": "2026-11-01T12:34:56+00:00",
            "content_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
    scrubbed = _scrub_tree(meta, lambda v: scrub_identifier(v, b"k" * 32))
    text = json.dumps(scrubbed)
    assert "jane.doe" not in text and TOKEN not in text and EMAIL not in text
    assert re.fullmatch(r"https://h\.example/p\?email=<EMAIL>-[0-9a-f]{12}&token=<SECRET>-[0-9a-f]{12}",
                        scrubbed["url"])
    assert scrubbed["status"] == 200
    assert scrubbed["fetched_at"] == meta["fetched_at"] and scrubbed["content_hash"] == meta["content_hash"]
