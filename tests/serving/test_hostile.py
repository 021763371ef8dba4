"""Hostile requests against a real `nightshift serve` process serving SmolLM2-135M (8,192-token window).

After each one an ordinary request must succeed, and the server's peak resident memory must stay within
its configured budget. Keys come from all three places a deployment uses: the key file (created with the
CLI), NIGHTSHIFT_API_KEYS (as a hash) and the Airflow connection `nightshift_serving`.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from helpers import ServeProcess, mlflow_store, publish, wait_for
from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.serving.keys import key_hash, new_key

pytestmark = pytest.mark.e2e

BUDGET_MB = 3072
TIMEOUT_S = 20  # generous: two 2,000-token prefills (about 8 s here) must fit in it on a loaded 2-core machine
HEADER_TIMEOUT_S = 3
EOS = 2  # SmolLM2's <|im_end|>; a bias of -100 keeps the model talking


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    registry = ModelRegistry(mlflow_store(home / "mlflow" / "mlflow.db"), "nightshift-llm",
                             (home / "mlflow" / "artifacts").as_uri())
    publish(registry, smollm2, "smollm2")
    env = {"NIGHTSHIFT_HOME": str(home)}
    created = subprocess.run([sys.executable, "-m", "nightshift.cli", "keys", "create", "--name", "hostile"],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True)
    cli_key = created.stdout.strip().splitlines()[-1]
    env_key, conn_key = new_key(), new_key()
    env.update({
        "NIGHTSHIFT_SERVE_MEMORY_MB": str(BUDGET_MB), "NIGHTSHIFT_SERVE_MAX_CONCURRENT": "2",
        "NIGHTSHIFT_SERVE_MAX_QUEUE": "2", "NIGHTSHIFT_SERVE_TIMEOUT_S": str(TIMEOUT_S),
        "NIGHTSHIFT_SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "NIGHTSHIFT_API_KEYS": key_hash(env_key),
        "AIRFLOW_CONN_NIGHTSHIFT_SERVING": json.dumps({"conn_type": "generic", "password": conn_key}),
    })
    with ServeProcess(home, env) as process:
        process.keys = {"cli": cli_key, "env": env_key, "conn": conn_key}
        process.tokenizer_dir = smollm2
        yield process
        print(f"\nserver peak memory {process.peak_rss_mb():.0f} MiB (budget {BUDGET_MB} MiB)")


def headers(server, which="cli"):
    return {"Authorization": f"Bearer {server.keys[which]}"}


def chat(server, content="When is the observatory open?", **extra):
    body = {"model": "nightshift-llm", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers(server), json=body, timeout=120)


def ordinary(server):
    """The next ordinary request is answered."""
    r = chat(server, max_tokens=4, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["system_fingerprint"] == "v1" and r.headers["x-request-id"]
    assert server.process.poll() is None


def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_every_configured_key_works_and_others_are_refused(server):
    for which in ("cli", "env", "conn"):
        r = httpx.get(f"{server.url}/v1/models", headers=headers(server, which))
        assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 8192
    error(httpx.get(f"{server.url}/v1/models"), 401)
    error(httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {new_key()}"},
                     json={"model": "nightshift-llm", "messages": []}), 401)
    error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}), 401)
    ordinary(server)


def test_oversized_bodies_are_refused_before_parsing(server):
    big = json.dumps({"model": "nightshift-llm", "messages": [{"role": "user", "content": "a" * 8_000_000}]})
    body = error(httpx.post(f"{server.url}/v1/chat/completions", headers={**headers(server),
                 "Content-Type": "application/json"}, content=big, timeout=60), 413)
    assert body["code"] == "request_too_large" and "1048576" in body["message"]

    def chunked():
        for _ in range(40):
            yield b"x" * 65536

    error(httpx.post(f"{server.url}/v1/completions", headers=headers(server), content=chunked(), timeout=60), 413)
    ordinary(server)


def test_a_prompt_over_the_window_is_refused_with_both_numbers(server):
    body = error(chat(server, "word " * 40_000), 400)
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert "8192" in body["message"] and "40" in body["message"]
    body = error(chat(server, "word " * 8_000, max_tokens=500), 400)
    assert "8192" in body["message"] and "500 in the completion" in body["message"]
    ordinary(server)


def test_huge_max_tokens_is_refused(server):
    body = error(chat(server, max_tokens=10**9), 400)
    assert body["param"] == "max_tokens" and "1000000000" in body["message"]
    error(chat(server, max_completion_tokens=10**12), 400)
    ordinary(server)


def test_malformed_and_mistyped_requests_get_400s_that_name_the_parameter(server):
    url = f"{server.url}/v1/chat/completions"
    error(httpx.post(url, headers={**headers(server), "Content-Type": "application/json"},
                     content=b'{"model": "nightshift-llm", "messages": [}'), 400)
    error(httpx.post(url, headers=headers(server), content=b"\xff\xfe not json at all"), 400)
    assert error(chat(server, max_tokens="lots"), 400)["param"] == "max_tokens"
    assert error(chat(server, temperature="hot"), 400)["param"] == "temperature"
    assert error(chat(server, temperature=7), 400)["param"] == "temperature"
    nested = "[" * 5000 + "]" * 5000
    error(httpx.post(url, headers={**headers(server), "Content-Type": "application/json"},
                     content=f'{{"model": "nightshift-llm", "messages": {nested}}}'.encode()), 400)
    r = httpx.post(url, headers=headers(server), json={"model": "nightshift-llm", "messages": "hi"})
    assert error(r, 400)["param"].startswith("messages")
    ordinary(server)


def test_inputs_that_once_crashed_are_answered_or_refused_on_one_kept_alive_connection(server):
    """Each of these was a 500, and a 500 closed the connection under the client's next request."""
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(headers=headers(server), timeout=120) as client:
        def post(**extra):
            body = {"model": "nightshift-llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    **extra}
            return client.post(url, json=body)

        greedy = post(temperature=0).json()["choices"][0]["message"]["content"]
        tiny = post(temperature=1e-40)
        assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == greedy
        for key in ("²", "7" * 5000):
            assert error(post(logit_bias={key: 1}), 400)["param"] == "logit_bias"
        raw = ('{"model": "nightshift-llm", "max_tokens": 4, "messages": [{"role": "user", "content": "a\\ud800b"}]}')
        assert error(client.post(url, content=raw.encode(), headers={"Content-Type": "application/json"}),
                     400)["code"] == "invalid_unicode"
        padded = post(messages=[{"role": "user", "content": "Hi", "padding": "x" * 100_000}])
        assert error(padded, 400)["message"] == "Unrecognized request argument supplied: messages[0].padding"
        empty_stop = post(stop="", temperature=0, max_tokens=6).json()["choices"][0]
        assert len(empty_stop["message"]["content"]) > 1 and empty_stop["finish_reason"] == "length"
        assert post(temperature=0).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(f"{server.url}{path}").status_code in (401, 404)
        assert httpx.get(f"{server.url}{path}", headers=headers(server)).status_code == 404
    ordinary(server)


def test_idle_and_dripping_sockets_hold_neither_probes_nor_answers_and_are_closed(server):
    """Two hundred sockets opened without a key and left idle (and one dripping its headers) once made every
    route, the liveness probe too, answer 503 for as long as they stayed open."""
    import socket

    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    drip = socket.create_connection(("127.0.0.1", server.port))
    try:
        drip.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        for probe in ("/livez", "/healthz"):
            r = httpx.get(f"{server.url}{probe}", timeout=5)
            assert r.status_code == 200, (probe, r.status_code)
        ordinary(server)
        opened = time.monotonic()
        for sock in [*idle, drip]:
            sock.settimeout(HEADER_TIMEOUT_S + 10)
            assert sock.recv(1) == b""  # closed by the server, not by the test
        assert time.monotonic() - opened < HEADER_TIMEOUT_S + 10
    finally:
        for sock in [*idle, drip]:
            sock.close()
    ordinary(server)

    # Headers in time, then a body dripped one byte a second: it once held an in-flight slot for as long as the
    # client liked; the whole body must now arrive within the same time as the headers.
    body = json.dumps({"model": "nightshift-llm", "prompt": "Hi", "max_tokens": 1}).encode()
    slow = socket.create_connection(("127.0.0.1", server.port))
    try:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + server.keys["cli"].encode() +
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        opened = time.monotonic()
        slow.settimeout(1)
        reply = b""
        for byte in body:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            try:
                reply += slow.recv(65536)
            except TimeoutError:
                continue
            if reply:
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - opened < HEADER_TIMEOUT_S + 5
    finally:
        slow.close()
    ordinary(server)


def test_unknown_model_and_unsupported_options(server):
    assert error(chat(server, model="gpt-4o"), 404)["code"] == "model_not_found"
    body = error(chat(server, n=3, tools=[{"type": "function", "function": {"name": "f"}}]), 400)
    assert "n, tools" in body["message"]
    assert "stream_optionz" in error(chat(server, stream_optionz={}), 400)["message"]
    ordinary(server)


def test_a_burst_above_the_bound_gets_429s_with_retry_after_and_no_errors(server):
    async def one(client):
        return await client.post(f"{server.url}/v1/completions", headers=headers(server), json={
            "model": "nightshift-llm", "prompt": "Once upon a time", "max_tokens": 40, "logit_bias": {str(EOS): -100},
        })

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(10)))

    answers = asyncio.run(burst())
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 4 + [429] * 6, codes  # 2 running + 2 queued
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "server_busy"
        else:
            assert r.json()["usage"]["completion_tokens"] == 40
    ordinary(server)


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(server):
    started = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=headers(server), timeout=60, json={
        "model": "nightshift-llm", "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
        "logit_bias": {str(EOS): -100},
    }) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                break
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["active"] == 0, 5, "the slot to be freed")
    assert time.monotonic() - started < 10  # 4,000 tokens would take minutes
    ordinary(server)


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot_too(server):
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=headers(server), timeout=httpx.Timeout(30, read=1.0),
                   json={"model": "nightshift-llm", "prompt": "Once upon a time", "max_tokens": 4000,
                         "logit_bias": {str(EOS): -100}})
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["active"] == 0, 5, "the slot to be freed")
    assert time.monotonic() - started < 10
    ordinary(server)


def test_a_stop_sequence_ends_a_stream_and_frees_the_slot(server):
    from transformers import AutoTokenizer

    x = AutoTokenizer.from_pretrained(server.tokenizer_dir)(" X", add_special_tokens=False)["input_ids"][0]
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", headers=headers(server), timeout=60, json={
        "model": "nightshift-llm", "prompt": "Hi", "max_tokens": 4000, "stream": True, "stop": [" X X X"],
        "logit_bias": {str(x): 100},
    })
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["text"] for e in events) == ""  # " X X" was held back, then cut
    assert time.monotonic() - started < 10
    assert httpx.get(f"{server.url}/healthz").json()["active"] == 0
    ordinary(server)


def test_a_request_past_its_timeout_is_stopped(server):
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", headers=headers(server), timeout=120, json={
        "model": "nightshift-llm", "prompt": "Once upon a time", "max_tokens": 8000, "logit_bias": {str(EOS): -100},
    })
    assert error(r, 504)["code"] == "timeout"
    assert TIMEOUT_S - 1 < time.monotonic() - started < TIMEOUT_S + 10
    ordinary(server)


def test_long_requests_wait_for_memory_and_the_process_stays_within_its_budget(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.tokenizer_dir)
    x = tokenizer(" X", add_special_tokens=False)["input_ids"][0]
    prompt = ("The observatory opens at dusk and closes at midnight. " * 400)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:2000]
    body = {"model": "nightshift-llm", "prompt": ids, "max_tokens": 6000, "stop": ["X"],
            "logit_bias": {str(x): 100}}

    async def both():
        async with httpx.AsyncClient(timeout=180) as client:
            first = asyncio.create_task(client.post(f"{server.url}/v1/completions", headers=headers(server),
                                                    json=body))
            second = asyncio.create_task(client.post(f"{server.url}/v1/completions", headers=headers(server),
                                                     json=body))
            seen = []
            while not (first.done() and second.done()):
                health = (await client.get(f"{server.url}/healthz")).json()
                seen.append((health["active"], health["waiting"]))
                await asyncio.sleep(0.2)
            return await first, await second, seen

    first, second, seen = asyncio.run(both())
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    # Two slots, but memory for one request of 8,000 tokens (prompt and completion) at a time: the second waited.
    assert (1, 1) in seen and max(active for active, _ in seen) == 1
    ordinary(server)
    assert server.peak_rss_mb() < BUDGET_MB


def test_a_client_that_stops_reading_its_stream_loses_its_place(tmp_path, long_window_model):
    """A streamed answer whose client never reads kept its request in flight for ever (each write waiting on a
    full socket buffer): two such clients held a bound of two, and everyone else got 503. A write that waits
    longer than the header timeout now closes the connection."""
    import socket
    import threading

    import uvicorn
    from transformers import AutoTokenizer

    from conftest import free_port
    from helpers import local_registry, ready
    from nightshift.serving.app import create_app
    from nightshift.serving.connections import protocol_class
    from nightshift.settings import ServingLimits

    registry = local_registry(tmp_path)
    publish(registry, long_window_model, "v1")
    limits = ServingLimits(max_in_flight=2, header_timeout_s=2, max_concurrent=8)
    app = create_app(registry, tmp_path / "cache", limits=limits, require_key=False, poll_seconds=0.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           http=protocol_class(limits.header_timeout_s)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url), what="the endpoint")
        tokenizer = AutoTokenizer.from_pretrained(str(long_window_model))
        # The token whose text is longest once escaped as JSON: megabytes of answer for a small body.
        wide = max(range(3, tokenizer.vocab_size), key=lambda i: len(json.dumps(tokenizer.decode([i]))))
        body = json.dumps({"model": "nightshift-llm", "prompt": [[wide] * 2000] * 32, "max_tokens": 1, "echo": True,
                           "stream": True}).encode()
        readers = []
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            readers.append(sock)  # never read
        time.sleep(1)
        ask = {"model": "nightshift-llm", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=ask, timeout=10).status_code == 503  # both places held

        def answered():
            return httpx.post(f"{url}/v1/completions", json=ask, timeout=10).status_code == 200

        wait_for(answered, timeout=limits.header_timeout_s + 10, what="the stalled streams to lose their places",
                 every=0.5)
        for sock in readers:  # what was written before is still delivered, then the connection ends
            sock.settimeout(10)
            while sock.recv(1 << 20):
                pass
            sock.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
