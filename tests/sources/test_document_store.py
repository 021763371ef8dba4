from pathlib import Path

import pytest

from nightshift.sources.document_store import read_store, resolve_store


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
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
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
