import json
import random

import pytest

from nightshift.monitoring.profiles import TokenCounter, corpus_metrics, profile_frame, read_profile, summarize
from planted import prose


def write_corpus(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def doc(i, text, language="en", pii=None, source="store"):
    import hashlib

    return {"id": f"{source}/{i}", "text": text, "format": "text", "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "meta": {"prep": {"language": language, **({"pii": pii} if pii else {})}}}


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer_dir):
    return tokenizer_dir / "tokenizer.json"


def test_metrics_are_exact_per_document_and_hold_no_text(tmp_path, tokenizer_file):
    docs = [doc(1, "one two three\nfour", pii={"email": 2, "phone": 1}), doc(2, "Hej då, världen", "sv", source="web")]
    metrics = corpus_metrics(write_corpus(tmp_path / "c.jsonl", docs), {"store": "folder"},
                             TokenCounter(tokenizer_file, 10))
    frame = metrics.frame
    assert list(frame["id"]) == ["store/1", "web/2"]
    assert list(frame["chars"]) == [18, 15] and list(frame["words"]) == [4, 3] and list(frame["lines"]) == [2, 1]
    assert list(frame["language"]) == ["en", "sv"] and list(frame["pii_scrubbed"]) == [3, 0]
    assert list(frame["kind"]) == ["folder", "unknown"] and list(frame["source"]) == ["store", "web"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    assert list(frame["tokens"]) == [len(tok.encode(d["text"], add_special_tokens=False).ids) for d in docs]
    assert "text" not in frame.columns and metrics.tokenized == 2


def test_tokens_are_counted_on_a_fixed_content_seeded_sample(tmp_path, tokenizer_file):
    rng = random.Random(3)
    docs = [doc(i, prose(rng, 3)) for i in range(200)]
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    first = corpus_metrics(corpus, {}, TokenCounter(tokenizer_file, 50)).frame
    shuffled = write_corpus(tmp_path / "d.jsonl", list(reversed(docs)))
    second = corpus_metrics(shuffled, {}, TokenCounter(tokenizer_file, 50)).frame
    assert first["tokens"].notna().sum() == 50
    # The same documents are sampled whatever their order: the sample is chosen by content hash.
    assert set(first.loc[first["tokens"].notna(), "id"]) == set(second.loc[second["tokens"].notna(), "id"])


def test_a_missing_tokenizer_leaves_tokens_empty_and_says_so(tmp_path, caplog):
    metrics = corpus_metrics(write_corpus(tmp_path / "c.jsonl", [doc(1, "some words here")]), {},
                             TokenCounter(tmp_path / "absent.json", 10))
    assert metrics.frame["tokens"].isna().all() and metrics.tokenized == 0
    assert "no tokenizer" in caplog.text


def test_profile_round_trips_and_summarizes(tmp_path, tokenizer_file):
    rng = random.Random(5)
    docs = [doc(i, prose(rng, rng.randint(2, 30)), "en" if i % 4 else "de") for i in range(400)]
    frame = corpus_metrics(write_corpus(tmp_path / "c.jsonl", docs), {}, TokenCounter(tokenizer_file, 100)).frame
    view = profile_frame(frame)
    again = read_profile(view.serialize())
    summary = summarize(again)
    assert summary["documents"] == 400
    chars = summary["columns"]["chars"]
    assert chars["min"] == frame["chars"].min() and chars["max"] == frame["chars"].max()
    assert abs(chars["quantiles"]["0.5"] - frame["chars"].median()) <= 0.05 * frame["chars"].median()
    assert sum(chars["histogram"]["counts"]) == pytest.approx(400, rel=0.01)
    languages = {t["value"]: t["count"] for t in summary["columns"]["language"]["top"]}
    assert languages == {"en": 300, "de": 100}
    assert summary["columns"]["tokens"]["n"] == 400 and summary["columns"]["tokens"]["null"] == 300
    assert "id" not in summary["columns"]
