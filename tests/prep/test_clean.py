from nightshift.prep.clean import Document, normalize_text, read_corpus, write_corpus
from nightshift.prep.curate import extract_text_of


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
