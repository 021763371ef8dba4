"""The engine path: nightshift's front (keys, routing, request log, versions) before an OpenAI-compatible engine.

No GPU here, so the engine is another real OpenAI-compatible server on 127.0.0.1: nightshift's own built-in
endpoint, which (like vLLM's /v1/models with --served-model-name nightshift-llm-v<N>) says which version it
serves. The vLLM naming is checked by the parser; the vLLM process itself needs a GPU node.
"""

import json

import httpx
import pytest
from openai import BadRequestError, OpenAI

from helpers import UvicornThread, local_registry, perturbed_copy, publish, ready, wait_for
from nightshift.serving.app import create_app
from nightshift.serving.keys import KeyRing, KeyStore
from nightshift.serving.requestlog import RequestLog
from nightshift.serving.upstream import served_version

QUESTION = [{"role": "user", "content": "When does the harbour open?"}]


def test_the_served_version_is_read_from_vllm_names_or_a_version_field():
    assert served_version({"id": "nightshift-llm-v12"}) == 12
    assert served_version({"id": "nightshift-llm", "version": 3}) == 3
    assert served_version({"id": "meta-llama/Llama-3.1-8B"}) is None


@pytest.fixture
def stack(tmp_path, tiny_model):
    registry = local_registry(tmp_path)
    publish(registry, tiny_model, "v1")
    v2 = publish(registry, perturbed_copy(tiny_model, tmp_path / "v2"), "v2", promote=False)
    store = KeyStore(tmp_path / "keys.json")
    key = store.create("front")[1]
    engine_app = create_app(registry, tmp_path / "engine-cache", require_key=False, poll_seconds=0.2)
    engine = UvicornThread(engine_app)
    engine.app_state = engine_app.state
    request_log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    with engine:
        wait_for(lambda: ready(engine.url), what="the engine")
        front_app = create_app(registry, tmp_path / "front-cache", keyring=KeyRing(store, recheck_seconds=0),
                               poll_seconds=0.2, request_log=request_log, upstreams={"champion": f"{engine.url}/v1"})
        front = UvicornThread(front_app)
        front.app_state = front_app.state
        with front:
            wait_for(lambda: ready(front.url), what="the front to find the engine")
            yield front, engine, registry, v2, key, request_log


def test_the_front_relays_the_engines_answers_under_its_own_ids_and_versions(stack):
    front, engine, registry, v2, key, request_log = stack
    direct = OpenAI(base_url=f"{engine.url}/v1", api_key="none", max_retries=0)
    client = OpenAI(base_url=f"{front.url}/v1", api_key=key, max_retries=0)
    expected = direct.chat.completions.create(model="nightshift-llm", messages=QUESTION, max_tokens=8,
                                              temperature=0).choices[0].message.content

    raw = client.chat.completions.with_raw_response.create(model="nightshift-llm", messages=QUESTION, max_tokens=8,
                                                           temperature=0)
    answer = raw.parse()
    assert answer.choices[0].message.content == expected
    assert answer.system_fingerprint == "v1" and answer.model == "nightshift-llm"
    assert raw.headers["x-nightshift-model-version"] == "1" and raw.headers["x-nightshift-model-role"] == "champion"
    assert answer.id.startswith("chatcmpl-") and raw.headers["x-request-id"] in answer.id
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="nightshift-llm", messages=QUESTION, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == expected
    completion = client.completions.create(model="nightshift-llm", prompt="The tide", max_tokens=5, temperature=0)
    assert completion.choices[0].text == direct.completions.create(
        model="nightshift-llm", prompt="The tide", max_tokens=5, temperature=0).choices[0].text

    logged = request_log.answer(answer.id)
    assert logged["model_version"] == 1 and logged["answer"] == [expected] and logged["key_id"]
    assert httpx.post(f"{front.url}/v1/feedback", json={"response_id": answer.id, "rating": 1},
                      headers={"Authorization": f"Bearer {key}"}).status_code == 201

    # The engine's refusals reach the client as the engine worded them; the front's keys stay in force.
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="nightshift-llm", messages=QUESTION, max_tokens=10**6)
    assert refused.value.code == "context_length_exceeded"
    assert httpx.post(f"{front.url}/v1/chat/completions", json={"model": "nightshift-llm",
                                                                "messages": QUESTION}).status_code == 401


def test_a_promotion_reaches_clients_only_once_the_engine_serves_it_and_a_dead_engine_is_a_502(stack):
    front, engine, registry, v2, key, _log = stack
    client = OpenAI(base_url=f"{front.url}/v1", api_key=key, max_retries=0)
    registry.promote(v2)
    wait_for(lambda: httpx.get(f"{front.url}/healthz").json()["version"] == 2, what="the front to follow the engine")
    direct = OpenAI(base_url=f"{engine.url}/v1", api_key="none", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="nightshift-llm", messages=QUESTION, max_tokens=8,
                                                           temperature=0)
    assert raw.headers["x-nightshift-model-version"] == "2"
    assert raw.parse().choices[0].message.content == direct.chat.completions.create(
        model="nightshift-llm", messages=QUESTION, max_tokens=8, temperature=0).choices[0].message.content

    engine.__exit__(None, None, None)  # the engine goes away
    r = httpx.post(f"{front.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "nightshift-llm", "messages": QUESTION, "max_tokens": 4})
    assert r.status_code == 502 and r.json()["error"]["code"] == "engine_unavailable"


def test_canary_and_shadow_route_to_the_candidates_engine(tmp_path, tiny_model):
    from nightshift.registry.rollout_state import Rollouts

    registry = local_registry(tmp_path)
    v2_folder = perturbed_copy(tiny_model, tmp_path / "v2")
    publish(registry, tiny_model, "v1")
    v2 = publish(registry, v2_folder, "v2", promote=False)
    # The candidate's engine: another registry whose champion is a v2 with the same weights. The champion's
    # engine has a registry of its own too: an engine that followed the front's rollout would route by itself.
    other = local_registry(tmp_path / "other")
    publish(other, tiny_model, "a", promote=False)
    publish(other, v2_folder, "b")
    own = local_registry(tmp_path / "own")
    publish(own, tiny_model, "a")
    request_log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    with UvicornThread(create_app(own, tmp_path / "e1", require_key=False, poll_seconds=0.2)) as e1, \
            UvicornThread(create_app(other, tmp_path / "e2", require_key=False, poll_seconds=0.2)) as e2:
        wait_for(lambda: ready(e1.url) and ready(e2.url), what="both engines")
        expected = {
            str(n): OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
                model="nightshift-llm", prompt="The tide", max_tokens=6, temperature=0).choices[0].text
            for n, url in ((1, e1.url), (2, e2.url))}
        assert expected["1"] != expected["2"]
        app = create_app(registry, tmp_path / "front", require_key=False, poll_seconds=0.2, request_log=request_log,
                         upstreams={"champion": f"{e1.url}/v1", "candidate": f"{e2.url}/v1"})
        with UvicornThread(app) as front:
            wait_for(lambda: ready(front.url), what="the front")
            rollouts = Rollouts(registry)
            rollouts.start(v2, "canary", 0.5)
            wait_for(lambda: httpx.get(f"{front.url}/healthz").json()["rollout"], what="the candidate's engine")
            seen = {}
            for i in range(40):
                r = httpx.post(f"{front.url}/v1/completions", json={
                    "model": "nightshift-llm", "prompt": "The tide", "max_tokens": 6, "temperature": 0,
                    "user": f"u{i}"})
                version = r.headers["x-nightshift-model-version"]
                assert r.json()["choices"][0]["text"] == expected[version]
                seen[version] = seen.get(version, 0) + 1
            assert seen.get("1") and seen.get("2"), seen

            rollouts.start(v2, "shadow", 0)
            wait_for(lambda: (httpx.get(f"{front.url}/healthz").json()["rollout"] or {}).get("mode") == "shadow",
                     what="shadow mode")
            r = httpx.post(f"{front.url}/v1/completions", json={
                "model": "nightshift-llm", "prompt": "The tide", "max_tokens": 6, "temperature": 0})
            assert r.headers["x-nightshift-model-version"] == "1" and r.json()["choices"][0]["text"] == expected["1"]
            rid = r.json()["id"]
            wait_for(lambda: request_log.answer(f"{rid}-shadow"), what="the shadow answer in the log")
            shadow = request_log.answer(f"{rid}-shadow")
            assert (shadow["model_version"], shadow["model_role"], shadow["answer"]) == (2, "shadow", [expected["2"]])


def test_a_plain_request_the_client_abandons_is_aborted_on_the_engine(stack):
    """The front closes its request to the engine when the client leaves, which is how vLLM aborts generation;
    the engine here frees its slot at once, as vLLM does on a closed connection."""
    import time

    front, engine, _registry, _v2, key, request_log = stack
    engine_server = engine.app_state.server
    model = engine_server.watcher.current.model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # a GPU engine's long answer: 400 tokens take about 10 s here
        time.sleep(0.025)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    eos = engine_server.watcher.current.eos_ids
    body = {"model": "nightshift-llm", "prompt": "The tide", "max_tokens": 400, "temperature": 0,
            "logit_bias": {str(e): -100 for e in eos}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{front.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                   timeout=httpx.Timeout(60, read=1.0))
    left = time.monotonic()
    wait_for(lambda: engine_server.admission.active == 0 and engine_server.scheduler.running == 0, timeout=10,
             what="the engine to stop generating", every=0.05)
    assert time.monotonic() - left < 3
    wait_for(lambda: front.app_state.server.admission.active == 0, timeout=5, what="the front's slot")
    model.forward = forward


def vllm_like_engine(version: int, delay: float):
    """An OpenAI-compatible stand-in that checks requests as vLLM does (an empty stop string is refused), counts
    the generations it runs at once, and can be told to fail."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = app.state
    state.bodies, state.active, state.peak, state.fail = [], 0, 0, False
    state.stream_fault = None  # "error event": vLLM's error chunk mid-stream; "break": the stream stops short
    state.shape = None  # "bad": a 200 whose body is not an OpenAI answer

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": f"nightshift-llm-v{version}", "max_model_len": 2048}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.bodies.append(body)
        if state.fail:
            return JSONResponse({"error": {"message": "CUDA error: an illegal memory access"}}, 500)
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
        if "" in stops:
            return JSONResponse({"error": {"message": "stop cannot contain an empty string."}}, 400)
        if body.get("stream"):
            from fastapi.responses import StreamingResponse

            async def events():
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": "v1 says"}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if state.stream_fault == "error event":
                    yield f"data: {json.dumps({'error': {'message': 'CUDA out of memory', 'code': 500}})}\n\n"
                    yield "data: [DONE]\n\n"
                # "break": the stream ends without a finish reason or [DONE], as when the engine dies

            return StreamingResponse(events(), media_type="text/event-stream")
        if state.shape == "bad":
            return {"choices": "zzz", "usage": "many"}
        state.active += 1
        state.peak = max(state.peak, state.active)
        try:
            await asyncio.sleep(delay)
        finally:
            state.active -= 1
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"v{version} says hi"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}

    return app


def test_shadows_take_a_slot_empty_stops_stay_home_and_engine_failures_are_logged(tmp_path, tiny_model):
    """Three slips of the engine path: a shadow answer went to the candidate's engine without a generation slot
    (two generations at once with one slot), an empty stop string reached vLLM (which refuses it: a 400 for a
    request the built-in path answers), and an answer the engine failed was never logged."""
    import threading
    import time

    from nightshift.registry.rollout_state import Rollouts
    from nightshift.settings import ServingLimits

    registry = local_registry(tmp_path)
    publish(registry, tiny_model, "v1")
    v2 = publish(registry, tiny_model, "v2", promote=False)
    champion, candidate = vllm_like_engine(1, 0.4), vllm_like_engine(2, 0.4)
    request_log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    with UvicornThread(champion) as e1, UvicornThread(candidate) as e2:
        app = create_app(registry, tmp_path / "front", limits=ServingLimits(max_concurrent=1, max_queue=8),
                         require_key=False, poll_seconds=0.2, request_log=request_log,
                         upstreams={"champion": f"{e1.url}/v1", "candidate": f"{e2.url}/v1"})
        with UvicornThread(app) as front:
            wait_for(lambda: ready(front.url), what="the front")
            Rollouts(registry).start(v2, "shadow", 0)
            wait_for(lambda: (httpx.get(f"{front.url}/healthz").json()["rollout"] or {}).get("mode") == "shadow",
                     what="shadow mode")
            both, done = [0], threading.Event()

            def watch():
                while not done.is_set():
                    both[0] = max(both[0], champion.state.active + candidate.state.active)
                    time.sleep(0.005)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                for i in range(4):
                    r = httpx.post(f"{front.url}/v1/chat/completions", timeout=30, json={
                        "model": "nightshift-llm", "messages": [{"role": "user", "content": f"q{i}"}]})
                    assert r.status_code == 200 and r.headers["x-nightshift-model-role"] == "champion"
                time.sleep(1)
            finally:
                done.set()
                watcher.join()
            assert both[0] == 1, both  # one slot: a shadow runs only while no answer does, or is skipped
            assert 1 <= len(candidate.state.bodies) <= 4

            r = httpx.post(f"{front.url}/v1/chat/completions", timeout=30, json={
                "model": "nightshift-llm", "messages": QUESTION, "stop": ["", "\n\n"]})
            assert r.status_code == 200, r.text
            assert champion.state.bodies[-1]["stop"] == ["\n\n"]

            champion.state.fail = True
            r = httpx.post(f"{front.url}/v1/chat/completions", timeout=30, json={
                "model": "nightshift-llm", "messages": QUESTION})
            assert r.status_code == 500
            failed = wait_for(lambda: request_log.answer(f"chatcmpl-{r.headers['x-request-id']}"),
                              what="the failed answer in the log")
            assert failed["finish"] == "error" and failed["model_version"] == 1

            # An engine that fails mid-stream (saying so, or breaking off) or answers 200 with something that is
            # not an answer: the client is told, and the answer is logged as an error, not as abandoned.
            champion.state.fail = False
            champion.state.shape = "bad"
            r = httpx.post(f"{front.url}/v1/chat/completions", timeout=30, json={
                "model": "nightshift-llm", "messages": QUESTION})
            assert r.status_code == 502 and r.json()["error"]["code"] == "engine_unavailable"
            ids = [f"chatcmpl-{r.headers['x-request-id']}"]
            for fault in ("error event", "break"):
                champion.state.stream_fault = fault
                with httpx.stream("POST", f"{front.url}/v1/chat/completions", timeout=30, json={
                        "model": "nightshift-llm", "messages": QUESTION, "stream": True}) as r:
                    events = [line for line in r.iter_lines() if line.startswith("data: ")]
                    ids.append(f"chatcmpl-{r.headers['x-request-id']}")
                assert '"error"' in events[-2] and events[-1] == "data: [DONE]", (fault, events)
            for rid in ids:
                assert wait_for(lambda rid=rid: request_log.answer(rid), what=rid)["finish"] == "error"
            assert httpx.get(f"{front.url}/healthz").json()["active"] == 0
