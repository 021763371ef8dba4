"""Document stores behind fsspec: the memory and the local file systems."""

import fsspec

from nightshift.sources.document_store import read_store
from nightshift.sources.object_store import read_object_store


def test_a_memory_store_reads_like_a_folder(tmp_path):
    fs = fsspec.filesystem("memory")
    files = {"guides/a.md": b"# Opening\n\nAt dusk.", "notes/b.txt": b"Tickets: 12 euros.",
             "faq.jsonl": b'{"id": "q1", "text": "Parking? Lower car park."}\nnot json\n',
             "logo.png": b"\x89PNG", "bad.txt": b"\xff\xfe\xfa", ".hidden/x.md": b"secret"}
    for rel, data in files.items():
        fs.pipe(f"/docs-test/{rel}", data)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    remote = read_object_store("memory://docs-test")
    local = read_store(tmp_path)
    as_file = read_object_store(tmp_path.as_uri())
    for result in (remote, as_file):
        assert [d.id for d in result.documents] == [d.id for d in local.documents]
        assert [d.content for d in result.documents] == [d.content for d in local.documents]
        assert result.skip_reasons() == local.skip_reasons()
    assert local.skip_reasons() == {"unsupported extension": 1, "not UTF-8 text": 1, "invalid JSON": 1}
    fs.rm("/docs-test", recursive=True)
