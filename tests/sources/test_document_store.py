import json
from pathlib import Path

import pytest

from nightshift.sources.document_store import read_raw, read_store, resolve_store, write_raw


def test_resolve_store_accepts_paths_and_file_uris(tmp_path):
    assert resolve_store(str(tmp_path)) == tmp_path.resolve()
    assert resolve_store(tmp_path.as_uri()) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("source", "error", "says"),
    [
        ("", ValueError, "empty"),
        ("s3://bucket/docs", ValueError, "not supported"),
        ("file://otherhost/docs", ValueError, "only local files"),
        ("/does/not/exist", FileNotFoundError, "does not exist"),
    ],
)
def test_resolve_store_rejects_unusable_sources_with_a_clear_error(source, error, says):
    with pytest.raises(error, match=says):
        resolve_store(source)


def test_resolve_store_rejects_a_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="give the folder"):
        resolve_store(str(f))


def test_read_store_reads_every_format_and_counts_what_it_skips(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title\n\nBody")
    (tmp_path / "sub" / "b.txt").write_text("plain")
    (tmp_path / "c.html").write_text("<html><body><p>hello</p></body></html>")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "x", "text": "one"}\n'
        "not json\n"
        '{"id": "y"}\n'
        "\n"
        '{"text": "no id uses the line number"}\n'
    )
    (tmp_path / "e.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "f.txt").write_bytes(b"\x80\x81bad")
    (tmp_path / ".hidden.md").write_text("secret")

    result = read_store(tmp_path)

    ids = [d.id for d in result.documents]
    assert ids == ["a.md", "c.html", "d.jsonl#x", "d.jsonl#5", "sub/b.txt"]
    assert result.formats == {"html": 1, "markdown": 1, "text": 3}
    reasons = {s.location: s.reason for s in result.skipped}
    assert reasons["d.jsonl:2"].startswith("invalid JSON")
    assert reasons["d.jsonl:3"] == "no string field 'text'"
    assert reasons["e.pdf"] == "unsupported extension: .pdf"
    assert reasons["f.txt"].startswith("not UTF-8 text")
    assert len(result.skipped) == 4
    assert result.skip_reasons() == {"invalid JSON": 1, "no string field 'text'": 1, "unsupported extension": 1,
                                     "not UTF-8 text": 1}
    # content is kept verbatim at this stage; sources are relative, so the corpus does not depend on the mount
    assert result.documents[0].content == "# Title\n\nBody"
    assert [d.source for d in result.documents] == ["a.md", "c.html", "d.jsonl:1", "d.jsonl:5", "sub/b.txt"]


def test_a_source_outside_the_allowed_roots_is_refused_even_through_a_link(tmp_path):
    from nightshift.sources.document_store import SourceNotAllowed

    allowed = tmp_path / "stores"
    (allowed / "docs").mkdir(parents=True)
    secret = tmp_path / "other-user"
    secret.mkdir()
    (secret / "notes.txt").write_text("db_password=hunter2")
    (allowed / "sneaky").symlink_to(secret, target_is_directory=True)
    assert resolve_store(str(allowed / "docs"), (allowed,)) == (allowed / "docs").resolve()
    for source in (str(secret), secret.as_uri(), str(allowed / "sneaky"), str(allowed / "docs" / ".." / ".."), "/etc"):
        with pytest.raises(SourceNotAllowed, match="NIGHTSHIFT_SOURCE_ROOTS") as refused:
            resolve_store(source, (allowed,))
        assert "hunter2" not in str(refused.value)


def test_links_out_of_the_store_and_unreadable_files_are_counted_skips(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / "ok.md").write_text("# fine")
    (store / "locked.txt").write_text("cannot be read")
    outside = tmp_path / "secret.txt"
    outside.write_text("db_password=hunter2")
    (store / "leak.txt").symlink_to(outside)
    real_open = Path.open

    def open_(self, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    result = read_store(store)
    assert [d.id for d in result.documents] == ["ok.md"]
    assert result.skip_reasons() == {"link outside the store": 1, "unreadable": 1}
    assert all("hunter2" not in d.content for d in result.documents)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_read_in_its_encoding(tmp_path: Path, codec):
    text = "Größe: 12 m — naïve café ☕"
    data = text.encode(codec)
    if codec in ("utf-16-be", "utf-16-le"):  # these codecs write no mark; add the one a Windows editor writes
        data = ("\ufeff" + text).encode(codec)
    (tmp_path / "w.txt").write_bytes(data)
    result = read_store(tmp_path)
    assert [d.content for d in result.documents] == [text] and not result.skipped


def test_utf16_with_a_broken_tail_is_a_counted_skip(tmp_path: Path):
    (tmp_path / "w.txt").write_bytes("ok".encode("utf-16") + b"\x00")
    result = read_store(tmp_path)
    assert not result.documents and result.skipped[0].reason.startswith("not UTF-8 text")


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def test_a_record_with_a_lone_surrogate_is_a_counted_skip_and_the_others_are_written(tmp_path: Path):
    good = [{"id": f"r{i}", "text": f"Record {i} of the export."} for i in range(100)]
    lines = _jsonl(*good[:50]).decode()
    lines += '{"id": "broken", "text": "cut emoji \\ud83d here"}\n'  # the escape, as a JavaScript export writes it
    lines += '{"id": "pair", "text": "whole emoji \\ud83d\\ude00"}\n'  # a pair is one character, and fine
    lines += '{"id": "id-\\udc00", "text": "a lone surrogate in the id"}\n'
    (tmp_path / "export.jsonl").write_text(lines + _jsonl(*good[50:]).decode(), encoding="utf-8")
    (tmp_path / "mixed.jsonl").write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9"}\n'
                                           b'{"id": "c", "text": "fine too"}\n')
    (tmp_path / "caf\udce9.md").write_bytes(b"a name that is not UTF-8")  # os-level bytes b"caf\xe9.md"

    result = read_store(tmp_path)

    ids = [d.id for d in result.documents]
    assert len(ids) == 103 and "export.jsonl#broken" not in ids and "mixed.jsonl#b" not in ids
    assert {"export.jsonl#pair", "mixed.jsonl#a", "mixed.jsonl#c"} <= set(ids)
    assert next(d for d in result.documents if d.id == "export.jsonl#pair").content == "whole emoji \U0001f600"
    assert {s.location: s.reason.split(":")[0] for s in result.skipped} == {
        "export.jsonl:51": "not UTF-8 text", "export.jsonl:53": "not UTF-8 text",
        "mixed.jsonl:2": "not UTF-8 text", "caf\ufffd.md": "not UTF-8 text"}
    assert write_raw(result.documents, tmp_path / "out" / "raw.jsonl") == 103  # nothing left that cannot be written
    assert [d.id for d in read_raw(tmp_path / "out" / "raw.jsonl")] == ids


@pytest.mark.parametrize("chunk", [5, 1024 * 1024])
def test_jsonl_records_end_at_newline_only_and_keep_their_exact_text(tmp_path: Path, monkeypatch, chunk):
    import nightshift.sources.document_store as store

    monkeypatch.setattr(store, "_CHUNK", chunk, raising=False)  # small chunks put record ends across chunk boundaries
    odd = {"ls": "before\u2028after", "nel": "before\u0085after", "ps": "a\u2029b", "fs": "a\x1cb\x1dc\x1ee",
           "ff": "a\x0cb\x0bc", "cr": "a\rb"}
    data = b"\xef\xbb\xbf" + _jsonl(*({"id": k, "text": v} for k, v in odd.items()))
    (tmp_path / "odd.jsonl").write_bytes(data.replace(b"\n", b"\r\n", 2) + b'\n  \n{"id": "last", "text": "end"}')
    result = read_store(tmp_path)
    assert {d.id.split("#")[1]: d.content for d in result.documents} == {**odd, "last": "end"}
    assert [d.source for d in result.documents][-1] == "odd.jsonl:9" and not result.skipped


def test_utf16_jsonl_is_read_by_records_too(tmp_path: Path):
    (tmp_path / "w.jsonl").write_bytes(_jsonl({"id": 1, "text": "größe\u2028x"}, {"id": 2, "text": "zwei"})
                                       .decode().encode("utf-16"))
    (tmp_path / "broken.jsonl").write_bytes('{"id": 1, "text": "eins"}\n'.encode("utf-16") + b"\x00")
    result = read_store(tmp_path)
    assert [(d.id, d.content) for d in result.documents] == [
        ("broken.jsonl#1", "eins"), ("w.jsonl#1", "größe\u2028x"), ("w.jsonl#2", "zwei")]
    assert [(s.location, s.reason.split(":")[0]) for s in result.skipped] == [("broken.jsonl:2", "not UTF-8 text")]


@pytest.mark.parametrize("chunk", [7, 1024 * 1024])
def test_a_record_over_the_limit_is_a_counted_skip_and_the_file_has_no_limit(tmp_path: Path, monkeypatch, chunk):
    import nightshift.sources.document_store as store

    monkeypatch.setattr(store, "_CHUNK", chunk, raising=False)
    monkeypatch.setattr(store, "MAX_RECORD_BYTES", 100, raising=False)
    monkeypatch.setattr(store, "MAX_FILE_BYTES", 500)
    records = [{"id": i, "text": "x" * (200 if i in (3, 9) else 40)} for i in range(20)]
    (tmp_path / "big.jsonl").write_bytes(_jsonl(*records))  # 1.5 KB, three times the file limit
    (tmp_path / "big.md").write_bytes(b"y" * 501)
    result = read_store(tmp_path)
    assert [d.id for d in result.documents] == [f"big.jsonl#{i}" for i in range(20) if i not in (3, 9)]
    assert all(d.content == "x" * 40 for d in result.documents)
    reasons = {s.location: s.reason for s in result.skipped}
    too_large = "record too large: over 100 bytes"
    assert reasons == {"big.jsonl:4": too_large, "big.jsonl:10": too_large,
                       "big.md": "file too large: 501 bytes, over the 500 byte limit of one markdown document "
                                 "(a JSONL export has no file limit, only one per record)"}


_READ_IN_A_FRESH_PROCESS = """
import json, sys, time
from pathlib import Path
from nightshift.sources.document_store import iter_store

def peak():  # this process's high-water resident memory (ru_maxrss would count the parent's, from the fork)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

sum(1 for _ in iter_store(Path(sys.argv[2]), []))  # warm: imports and first allocations
before = peak()
started = time.perf_counter()
skipped, count, chars = [], 0, 0
for doc in iter_store(Path(sys.argv[1]), skipped):
    count += 1
    chars += len(doc.content)
print(json.dumps({"count": count, "chars": chars, "skipped": len(skipped), "seconds": time.perf_counter() - started,
                  "grew": peak() - before}))
"""


def test_a_65_mib_export_of_200k_records_is_read_whole_in_bounded_memory(tmp_path: Path):
    import subprocess
    import sys

    from nightshift.sources.document_store import MAX_FILE_BYTES

    body = "The refractor is pointed by the duty astronomer \u2028 while school groups wait; " * 3
    line = json.dumps({"id": "{}", "text": body}, ensure_ascii=False).replace("{}", "%d").encode()
    n = 200_000
    pad = (65 * 1024 * 1024 // n) - len(line % 0) - 1
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    data = b"\n".join(line.replace(b"while", b"while" + b" " * pad, 1) % i for i in range(n)) + b"\n"
    (tmp_path / "big" / "export.jsonl").write_bytes(data)
    (tmp_path / "small" / "export.jsonl").write_bytes(data[:10_000].rsplit(b"\n", 1)[0])
    assert len(data) > MAX_FILE_BYTES
    del data
    # A fresh process, so that its peak resident memory is the reader's alone.
    out = subprocess.run([sys.executable, "-c", _READ_IN_A_FRESH_PROCESS, str(tmp_path / "big"),
                          str(tmp_path / "small")], check=True, capture_output=True, text=True, timeout=120)
    read = json.loads(out.stdout)
    print(f"65 MiB export: {n} records in {read['seconds']:.2f} s; peak memory grew {read['grew'] / 2**20:.1f} MiB")
    assert read["count"] == n and read["skipped"] == 0
    assert read["chars"] == n * len(body.replace("while", "while" + " " * pad, 1))
    assert read["grew"] < 16 * 1024 * 1024  # a few chunks and one record, never the 65 MiB file


def test_a_number_python_cannot_convert_and_odd_ids_cost_one_record_or_nothing(tmp_path: Path):
    lines = [json.dumps({"id": i, "text": f"good document {i}"}) for i in range(20)]
    lines.insert(10, '{"id": "bad", "text": "x", "n": ' + "1" * 5000 + "}")  # valid JSON, refused by int()
    lines.append(json.dumps({"id": "x" * 10_000, "text": "a very long id"}))
    lines.append(json.dumps({"id": {"nested": [1, 2]}, "text": "an id that is an object"}))
    lines.append(json.dumps({"id": True, "text": "an id that is a boolean"}))
    (tmp_path / "export.jsonl").write_text("\n".join(lines) + "\n")
    result = read_store(tmp_path)
    assert [(s.location, s.reason) for s in result.skipped] == [
        ("export.jsonl:11", "invalid JSON: a number too long to convert")]
    ids = [d.id for d in result.documents]
    assert len(ids) == 23 and len(set(ids)) == 23 and max(len(i) for i in ids) < 120
    assert ids[-2:] == ["export.jsonl#23", "export.jsonl#24"]  # not an id: the line number stands in
