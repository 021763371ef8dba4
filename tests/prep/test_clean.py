from nightshift.prep.clean import Document, normalize_text, read_corpus, write_corpus
from nightshift.prep.curator import extract_text_of


def test_normalize_fixes_mojibake_and_whitespace():
    assert normalize_text("cafÃ©  \r\n\r\n\r\n\r\nnext line   \n") == "café\n\nnext line"


def test_html_keeps_text_and_drops_markup():
    html = "<html><head><title>t</title><script>var x=1;</script></head><body><p>Visible words here.</p></body></html>"
    assert normalize_text(extract_text_of("html", html)) == "Visible words here."


def test_corpus_files_round_trip(tmp_path):
    docs = [Document("a.txt", "a.txt", "text", "alpha", "0" * 64, {"url": "file:///a.txt"})]
    path = write_corpus(docs, tmp_path / "c.jsonl")
    assert list(read_corpus(path)) == docs


def test_skipping_ftfy_on_plain_ascii_changes_nothing():
    import random

    import ftfy

    rng = random.Random(0)
    chars = [chr(c) for c in range(32, 127) if chr(c) != "&"] + ["\n", "\t"]
    for _ in range(5000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 200)))
        assert ftfy.fix_text(text, normalization="NFC") == text
    assert normalize_text("Fish &amp; chips\x1b[31m") == "Fish & chips"  # such text still goes through ftfy


def test_html_code_blocks_survive_extraction_and_normalisation_as_fenced_markdown():
    from nightshift.prep.clean import extract_text
    from nightshift.sources.document_store import RawDocument

    # PostgreSQL's tutorial-select.html (Debian's postgresql-doc-15), cut small: a query and its result
    html = """<html><head><title>2.5. Querying a Table</title></head><body><div class="sect1">
<h2 class="title">2.5. Querying a Table</h2><p>To retrieve data from a table, the table is
<em class="firstterm">queried</em>. An <acronym class="acronym">SQL</acronym> <code class="command">SELECT</code>
statement is used to do this. The statement is divided into a select list (the part that lists the columns
to be returned), a table list (the part that lists the tables from which to retrieve the data), and an
optional qualification (the part that specifies any restrictions).</p>
<pre class="programlisting">SELECT * FROM weather;</pre><p>The output should be:</p><pre class="screen">
     city      | temp_lo | temp_hi | prcp |    date
---------------+---------+---------+------+------------
 San Francisco |      46 |      50 | 0.25 | 1994-11-27

(1 row)
</pre><p>You can write expressions, not just simple column references, in the select list.</p></div>
</body></html>"""
    text = normalize_text(extract_text(RawDocument(id="t", source="t", format="html", content=html)))
    assert "## 2.5. Querying a Table" in text
    assert "restrictions).\n\n```\nSELECT * FROM weather;\n```\n\nThe output should be:" in text
    assert ("```\n     city      | temp_lo | temp_hi | prcp |    date\n---------------+---------+---------+------+"
            "------------\n San Francisco |      46 |      50 | 0.25 | 1994-11-27\n\n(1 row)\n```") in text
