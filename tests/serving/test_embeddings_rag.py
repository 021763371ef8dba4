"""/v1/embeddings through the official openai client (vectors equal to sentence-transformers' own), and answers
grounded in the champion's dataset version's index, with citations in the answer, its header and the request log."""

import json

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from helpers import UvicornThread, local_registry, publish, ready, wait_for
from nightshift.embeddings import default_model_dir, embedder
from nightshift.retrieval.cache import EmbeddingCache
from nightshift.retrieval.config import RetrievalConfig
from nightshift.retrieval.indexing import build_index
from nightshift.retrieval.store import FileStore
from nightshift.serving.app import create_app
from nightshift.serving.keys import KeyRing, KeyStore
from nightshift.serving.requestlog import RequestLog
from nightshift.serving.retrieval import ServingRetrieval
from nightshift.settings import SAMPLE_STORE

WIND = "At what wind speed do the domes stay closed?"


def corpus(path):
    rows = [{"id": f"samples/{f.relative_to(SAMPLE_STORE).as_posix()}", "text": f.read_text()}
            for f in sorted([*SAMPLE_STORE.glob("guides/*.md"), *SAMPLE_STORE.glob("notes/*.txt")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("rag")
    registry = local_registry(tmp)
    publish(registry, tiny_model, "v1")  # its dataset version: ds-v1
    config = RetrievalConfig(chunk_tokens=96, chunk_overlap=16, context_tokens=400)
    store = FileStore(tmp / "indexes", config)
    model = embedder()
    build_index(corpus(tmp / "c.jsonl"), "ds-v1", store, model,
                EmbeddingCache(tmp / "cache.sqlite", model.key, model.dimensions), config)
    keys = KeyStore(tmp / "keys.json")
    _record, key = keys.create("tests")
    request_log = RequestLog(f"sqlite:///{tmp / 'requests.db'}")
    app = create_app(registry, tmp / "cache", keyring=KeyRing(keys), poll_seconds=0.2, request_log=request_log,
                     retrieval=ServingRetrieval(config, store))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion")
        yield server, key, request_log, registry, tmp


def client(served):
    from openai import OpenAI

    server, key, *_ = served
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def post(served, path, body, key=None):
    server, default, *_ = served
    # json.dumps escapes a lone surrogate as \\ud800, as a hostile client sends it (httpx would refuse to).
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=60,
                      headers={"Authorization": f"Bearer {key or default}", "Content-Type": "application/json"})


def test_the_openai_client_gets_sentence_transformers_vectors(served):
    from sentence_transformers import SentenceTransformer

    texts = ["When is the observatory open?", "Ünïcode テキスト 🔭", "wind " * 200]
    expected = SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    api = client(served)
    # The client asks for base64 by default and decodes it; as floats the same numbers come back.
    got = api.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "all-MiniLM-L6-v2"
    assert np.abs(np.array([d.embedding for d in got.data]) - expected).max() < 1e-5
    floats = api.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    assert np.abs(np.array(floats.data[0].embedding) - expected[0]).max() < 1e-5
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(embedder().count_tokens(texts))
    ids = embedder().tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    by_ids = api.embeddings.create(model="all-MiniLM-L6-v2", input=ids, encoding_format="float")
    assert np.abs(np.array(by_ids.data[0].embedding) - expected[0]).max() < 1e-5
    same = api.embeddings.create(model="all-MiniLM-L6-v2", input=[ids, ids[:3]], dimensions=384)
    assert len(same.data) == 2


@pytest.mark.parametrize("body,status,param", [
    ({"input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": "word " * 300}, 400, "input"),
    ({"input": [[1, 2], [10**9]]}, 400, "input"),
    ({"input": ["x"] * 2049}, 400, "input"),
    ({"input": "x", "truncate": True}, 400, "truncate"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "abc \ud800 def"}, 400, "input"),
    ({"input": [True, False]}, 400, "input.str"),
    ({"input": [1000.0, 2000.0]}, 400, "input.str"),
    ({"input": "x", "dimensions": "384"}, 400, "dimensions"),
])
def test_what_cannot_be_honoured_is_refused_by_name(served, body, status, param):
    r = post(served, "/v1/embeddings", {"model": "all-MiniLM-L6-v2", **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_embeddings_sit_behind_the_keys_and_are_counted(served):
    server, *_ = served
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"}, timeout=30)
    assert r.status_code == 401
    post(served, "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "counted"})
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {served[1]}"}).text
    assert 'nightshift_requests_total{route="/v1/embeddings",status="200"}' in metrics
    assert 'nightshift_tokens_total{kind="embedding",version="embedding"}' in metrics


def test_a_grounded_answer_cites_the_one_document_that_holds_it(served):
    server, _key, request_log, *_ = served
    api = client(served)
    raw = api.chat.completions.with_raw_response.create(
        model="nightshift-llm+rag", messages=[{"role": "user", "content": WIND}], max_tokens=4, temperature=0)
    answer = raw.parse()
    citations = answer.model_extra["citations"]
    assert citations[0]["document"] == "samples/notes/weather.txt" and citations[0]["number"] == 1
    assert citations[0]["used"] == "whole" and citations[0]["score"] > 0.4
    assert all(set(c) == {"number", "document", "chunk", "score", "used"} for c in citations)
    assert raw.headers["x-nightshift-citations"].split(",")[0] == "samples%2Fnotes%2Fweather.txt"
    plain = api.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": WIND}],
                                        max_tokens=4, temperature=0)
    assert "citations" not in (plain.model_extra or {})
    # The documents went into the prompt: far more prompt tokens than the question alone.
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    request_log.flush()
    with request_log.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT citations, request FROM nightshift_responses WHERE response_id = :r"),
                           {"r": answer.id}).one()
    assert json.loads(row.citations) == citations
    assert "weather" not in row.request  # the caller's messages are logged, not the documents added to them

    one = post(served, "/v1/chat/completions", {"model": "nightshift-llm", "rag": {"top_k": 1}, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": WIND}]})
    assert one.status_code == 200 and len(one.json()["citations"]) == 1
    streamed = post(served, "/v1/chat/completions", {"model": "nightshift-llm+rag", "stream": True, "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": WIND}]})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["citations"][0]["document"] == "samples/notes/weather.txt"
    assert all("citations" not in c for c in chunks[1:])


def test_the_budget_cuts_and_leaves_out_chunks_and_says_so(served):
    server, *_ = served
    # A window nearly filled by the conversation: max_tokens leaves room for part of one chunk at most.
    long = WIND + " Please answer briefly." * 90
    r = post(served, "/v1/chat/completions", {"model": "nightshift-llm+rag", "max_tokens": 8,
                                              "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 200, r.text
    used = [c["used"] for c in r.json()["citations"]]
    assert "left_out" in used and used.count("whole") < len(used)
    assert all(c["number"] is None for c in r.json()["citations"] if c["used"] == "left_out")


def test_what_retrieval_cannot_do_is_refused(served, tiny_model):
    server, _key, _log, registry, tmp = served
    r = post(served, "/v1/chat/completions", {"model": "nightshift-llm+rag", "max_tokens": 2,
                                              "messages": [{"role": "system", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(served, "/v1/completions", {"model": "nightshift-llm+rag", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400
    r = post(served, "/v1/chat/completions", {"model": "nightshift-llm", "rag": {"top_k": 99}, "max_tokens": 2,
                                              "messages": [{"role": "user", "content": WIND}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rag.top_k"
    for bad in ({"k": 2}, {"top_k": True}, 1, "yes", []):
        r = post(served, "/v1/chat/completions", {"model": "nightshift-llm", "rag": bad, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": WIND}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rag", bad
    r = post(served, "/v1/chat/completions", {"model": "other+rag", "max_tokens": 2,
                                              "messages": [{"role": "user", "content": WIND}]})
    assert r.status_code == 404
    # A new champion trained on a version with no index yet: retrieval says so, plain answers go on.
    publish(registry, tiny_model, "v2")
    wait_for(lambda: (ready(server.url) or {}).get("version") == 2, what="the new champion")
    r = post(served, "/v1/chat/completions", {"model": "nightshift-llm+rag", "max_tokens": 2,
                                              "messages": [{"role": "user", "content": WIND}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "index_unavailable"
    assert "ds-v2" in r.json()["error"]["message"]
