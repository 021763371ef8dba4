"""POST /v1/feedback and the request log through the real endpoint, and `nightshift trace` down to the dataset bytes."""

import json

import httpx
import pytest
from openai import OpenAI

from helpers import UvicornThread, home_registry, ready, wait_for

PHONE = "+44 20 7946 0958"


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model):
    """A home with a versioned dataset and a champion trained (nominally) on it."""
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "The harbour opens at six."}\n')
    dataset = dataset_repository(settings).commit(corpus, {"documents": 1})
    registry = home_registry(settings)
    run_id = registry.open_run("finetune_model", "finetune_model/night-1", "night-1",
                               {"airflow.run_key": "finetune_model/night-1"})
    registry.upload_checkpoint(run_id, tiny_model)
    registry.promote(registry.register(run_id, tags={"nightshift.dataset_tag": dataset.tag}))
    return settings, dataset


@pytest.fixture
def served(home, tmp_path):
    from nightshift.serving.app import create_app
    from nightshift.serving.keys import KeyRing, KeyStore
    from nightshift.serving.requestlog import RequestLog
    from nightshift.stores import registry_for

    settings, dataset = home
    store = KeyStore(settings.key_file)
    keys = [store.create("alice")[1], store.create("bob")[1]]
    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(registry_for(settings), tmp_path / "cache", keyring=KeyRing(store, recheck_seconds=0),
                     poll_seconds=0.2, request_log=RequestLog(settings.request_log_url))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the model")
        yield server, keys, settings, dataset


def test_feedback_on_an_answer_is_stored_with_its_version_and_traces_to_the_dataset_bytes(served, capsys,
                                                                                          monkeypatch):
    import os

    from nightshift.cli import main

    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr("nightshift.cli.PRIVATE_UMASK", umask)  # main() would set it for the whole process

    server, (alice, bob), settings, dataset = served
    client = OpenAI(base_url=f"{server.url}/v1", api_key=alice, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="nightshift-llm", messages=[{"role": "user", "content": f"Call me on {PHONE} about the tide"}],
        max_tokens=5, temperature=0)
    answer, request_id = raw.parse(), raw.headers["x-request-id"]
    streamed = list(client.chat.completions.create(
        model="nightshift-llm", messages=[{"role": "user", "content": "And the ferry?"}], max_tokens=5,
        temperature=0, stream=True))

    def post(key, **body):
        return httpx.post(f"{server.url}/v1/feedback", json=body,
                          headers={"Authorization": f"Bearer {key}"} if key else {})

    r = post(alice, response_id=answer.id, rating=-1, correction=f"Ring {PHONE} after six", comment="late")
    assert r.status_code == 201, r.text
    assert r.json()["model_version"] == 1 and r.json()["id"].startswith("fb-")
    assert post(alice, response_id=streamed[0].id, rating=1).status_code == 201  # streamed answers are logged too
    assert post(bob, response_id=answer.id, rating=1).status_code == 404  # not bob's answer
    assert post(alice, response_id="chatcmpl-unknown", rating=1).status_code == 404
    bad = post(alice, response_id=answer.id, rating=5)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    assert post(alice, response_id="../../etc", rating=1).status_code == 400
    assert post(alice, response_id=answer.id, rating=1, correction="x" * 20_000).status_code == 400
    assert post(None, response_id=answer.id, rating=1).status_code == 401

    capsys.readouterr()
    assert main(["trace", answer.id, "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    logged, lineage = traced["answer"], traced["lineage"]
    assert PHONE not in json.dumps(traced)
    assert "<PHONE>" in logged["request"][0]["content"]
    assert logged["answer"] == [answer.choices[0].message.content]
    assert [(f["rating"], f["correction"]) for f in logged["feedback"]] == [(-1, "Ring <PHONE> after six")]
    assert lineage["model"]["version"] == 1
    assert lineage["run"]["dag_run"] == "finetune_model/night-1"
    assert lineage["dataset"]["tag"] == dataset.tag and lineage["dataset"]["md5"] == dataset.md5
    assert main(["trace", answer.id]) == 0
    text = capsys.readouterr().out
    assert f"md5 {dataset.md5}" in text and "rating -1 with a correction" in text
    assert main(["trace", "chatcmpl-nothing"]) == 1
    capsys.readouterr()
    # The X-Request-Id the README also names finds the same answer (it once found nothing).
    assert main(["trace", request_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"]["response_id"] == answer.id


def test_a_locked_request_log_delays_neither_answers_nor_probes_and_a_key_rates_an_answer_once(served):
    """Forty feedback posts wait on a request-log database held locked: chat and /healthz answer as usual, the
    posts beyond what the log's own threads take are told to retry, and the ratings of one answer by one key
    end as one rating."""
    import asyncio
    import sqlite3
    import threading
    import time

    server, (alice, bob), settings, _ = served
    auth = {"Authorization": f"Bearer {alice}"}
    client = OpenAI(base_url=f"{server.url}/v1", api_key=alice, max_retries=0)
    answer = client.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0)
    first = httpx.post(f"{server.url}/v1/feedback", headers=auth, json={"response_id": answer.id, "rating": 1})
    again = httpx.post(f"{server.url}/v1/feedback", headers=auth, json={"response_id": answer.id, "rating": -1})
    assert (first.status_code, first.json()["replaced"]) == (201, False)
    assert (again.status_code, again.json()["replaced"], again.json()["id"]) == (201, True, first.json()["id"])

    database = settings.request_log_url.removeprefix("sqlite:///")
    lock = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(8, lock.rollback)
    release.start()

    async def meanwhile():
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=60) as http:
            posts = [asyncio.ensure_future(http.post("/v1/feedback", json={"response_id": answer.id, "rating": -1}))
                     for _ in range(40)]
            await asyncio.sleep(1)
            started = time.monotonic()
            probe = await http.get("/healthz")
            probed = time.monotonic() - started
            chat = await http.post("/v1/chat/completions", json={
                "model": "nightshift-llm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
            answered = time.monotonic() - started - probed
            return probe, probed, chat, answered, await asyncio.gather(*posts)

    try:
        probe, probed, chat, answered, posts = asyncio.run(meanwhile())
    finally:
        release.join()
        lock.close()
    assert probe.status_code == 200 and chat.status_code == 200
    assert probed < 2 and answered < 2, (probed, answered)  # both took seconds while posts held every thread
    statuses = [p.status_code for p in posts]
    assert set(statuses) <= {201, 503} and statuses.count(503) >= 24
    assert all(p.headers["retry-after"] and p.json()["error"]["code"] == "request_log_busy"
               for p in posts if p.status_code == 503)

    def rated_again():  # as a client that honours Retry-After would, once the database is free
        r = httpx.post(f"{server.url}/v1/feedback", headers=auth, json={"response_id": answer.id, "rating": 0})
        return r if r.status_code == 201 else None

    assert wait_for(rated_again, timeout=60, what="feedback after the lock", every=0.5).json()["replaced"]
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT rating FROM nightshift_feedback WHERE response_id = ?",
                            (answer.id,)).fetchall() == [(0,)]


def test_a_stream_its_client_leaves_is_logged_as_cancelled(served):
    """A streamed answer whose client closed the connection mid-way was never logged (and counted nowhere),
    while a plain one was; both are now logged, with finish ``cancelled`` and the text generated so far."""
    import socket
    import sqlite3

    server, (alice, _bob), settings, _ = served
    body = json.dumps({"model": "nightshift-llm", "prompt": "The harbour", "max_tokens": 400, "stream": True,
                       "logit_bias": {"2": -100}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {alice}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = sock.recv(65536).decode(errors="replace")
        assert head.startswith("HTTP/1.1 200"), head[:200]
        request_id = next(line.split(":", 1)[1].strip() for line in head.splitlines()
                          if line.lower().startswith("x-request-id:"))
    database = settings.request_log_url.removeprefix("sqlite:///")

    def logged():
        with sqlite3.connect(database) as conn:
            return conn.execute("SELECT finish, completion_tokens FROM nightshift_responses WHERE response_id = ?",
                                (f"cmpl-{request_id}",)).fetchone()

    finish, tokens = wait_for(logged, timeout=30, what="the abandoned stream in the request log")
    assert finish == "cancelled" and tokens < 400
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["active"] == 0, timeout=10, what="the slot")
