from nightshift.prep.clean import normalize_text, prepare, read_corpus, write_corpus
from nightshift.sources.document_store import RawDocument


def raw(doc_id, content, fmt="text"):
    return RawDocument(id=doc_id, source=f"file:///{doc_id}", format=fmt, content=content)


def test_normalize_fixes_mojibake_and_whitespace():
    assert normalize_text("cafÃ©  \r\n\r\n\r\n\r\nnext line   \n") == "café\n\nnext line"


def test_html_keeps_text_and_drops_markup():
    html = "<html><head><title>t</title><script>var x=1;</script></head><body><p>Visible words here.</p></body></html>"
    docs = prepare([raw("p.html", html, "html")]).documents
    assert docs[0].text == "Visible words here."


def test_exact_duplicates_are_dropped_and_counted_keeping_the_first_by_id():
    result = prepare([raw("b.txt", "same text"), raw("a.txt", "same text\n"), raw("c.txt", "other")])
    assert [d.id for d in result.documents] == ["a.txt", "c.txt"]
    assert result.duplicates == 1
    assert result.stats()["documents"] == 2


def test_empty_documents_are_explained_skips():
    result = prepare([raw("empty.txt", "  \n\n "), raw("ok.txt", "fine")])
    assert [d.id for d in result.documents] == ["ok.txt"]
    assert [(s.location, s.reason) for s in result.skipped] == [("empty.txt", "empty after extraction")]


def test_corpus_bytes_do_not_depend_on_input_order(tmp_path):
    docs = [raw("b.txt", "beta"), raw("a.txt", "alpha")]
    first = write_corpus(prepare(docs).documents, tmp_path / "1.jsonl").read_bytes()
    second = write_corpus(prepare(list(reversed(docs))).documents, tmp_path / "2.jsonl").read_bytes()
    assert first == second
    assert [d.id for d in read_corpus(tmp_path / "1.jsonl")] == ["a.txt", "b.txt"]
