"""The endpoint in a real uvicorn server on 127.0.0.1, called with the official openai client (sync, async, stream)."""

import asyncio
import json
import math

import httpx
import pytest
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, NotFoundError, OpenAI

from helpers import UvicornThread, local_registry, publish, ready, wait_for
from nightshift.serving.app import create_app
from nightshift.serving.keys import KeyRing, KeyStore, key_hash, new_key
from nightshift.settings import ServingLimits


@pytest.fixture
def registry(tmp_path):
    return local_registry(tmp_path)


@pytest.fixture
def store(tmp_path):
    return KeyStore(tmp_path / "keys" / "api_keys.json")


@pytest.fixture
def key(store):
    return store.create("tests")[1]


def serve(registry, tmp_path, store, **kwargs):
    keyring = KeyRing(store, kwargs.pop("fixed", None), recheck_seconds=0)
    return UvicornThread(create_app(registry, tmp_path / "cache", keyring=keyring, poll_seconds=0.2, **kwargs))


def test_no_champion_yet_is_a_503_not_a_crash(registry, tmp_path, store, key):
    with serve(registry, tmp_path, store) as server:
        health = wait_for(lambda: httpx.get(f"{server.url}/healthz").json(), what="healthz")
        health = wait_for(lambda: (h := httpx.get(f"{server.url}/healthz")).json()["status"] == "no_model" and h,
                          what="no_model")
        assert health.status_code == 503 and "alias" in health.json()["detail"]
        assert httpx.get(f"{server.url}/livez").status_code == 200
        r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "nightshift-llm", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "alias" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "5"
        # The promotion history is behind the key too; before any move it is empty.
        assert httpx.get(f"{server.url}/v1/champion/history").status_code == 401
        history = httpx.get(f"{server.url}/v1/champion/history", headers={"Authorization": f"Bearer {key}"},
                            params={"at": "2026-01-01T00:00:00Z"})
        assert history.status_code == 200
        assert history.json()["moves"] == [] and history.json()["champion"]["version"] is None


def test_openai_client_talks_to_the_champion_and_sees_the_new_one_without_restart(
    registry, tiny_model, tmp_path, store, key
):
    publish(registry, tiny_model, "one")
    with serve(registry, tmp_path, store) as server:
        wait_for(lambda: ready(server.url), what="the first model")
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        assert [(m.id, m.version) for m in client.models.list().data] == [("nightshift-llm", 1)]

        chat = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
        )
        assert chat.system_fingerprint == "v1" and chat.id.startswith("chatcmpl-")
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens <= 5 and chat.choices[0].finish_reason in ("stop", "length")

        completion = client.completions.create(model="nightshift-llm", prompt="The sky", max_tokens=4)
        assert completion.system_fingerprint == "v1" and completion.usage.completion_tokens <= 4

        stream = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4
        assert len({c.id for c in chunks}) == 1

        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

        publish(registry, tiny_model, "two")  # the alias moves to v2 while the server runs
        wait_for(lambda: (ready(server.url) or {}).get("version") == 2, what="the new champion")
        chat = client.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2)
        assert chat.system_fingerprint == "v2"
        assert httpx.get(f"{server.url}/healthz").json()["dataset"] == "ds-two"


def test_async_client_gets_distinct_answers_with_unique_ids(champion, tmp_path, store, key):
    registry = champion

    async def ask(client, i):
        return await client.completions.create(model="nightshift-llm", prompt=f"Number {i}", max_tokens=3, seed=i)

    async def main(url):
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        return await asyncio.gather(*(ask(client, i) for i in range(6)))

    with serve(registry, tmp_path, store, limits=ServingLimits(max_concurrent=2, max_queue=8)) as server:
        wait_for(lambda: ready(server.url), what="the model")
        answers = asyncio.run(main(server.url))
    assert len({a.id for a in answers}) == 6
    assert all(a.system_fingerprint == "v1" and a.usage.completion_tokens <= 3 for a in answers)


def test_keys_are_required_revocable_and_accepted_from_the_deployment(champion, tmp_path, store, key):
    registry = champion
    deployed = new_key()
    with serve(registry, tmp_path, store, fixed={key_hash(deployed): "env"}) as server:
        wait_for(lambda: ready(server.url), what="the model")
        for presented in ("ns-wrong", "sk-" + "x" * 40, new_key()):
            client = OpenAI(base_url=f"{server.url}/v1", api_key=presented, max_retries=0)
            with pytest.raises(AuthenticationError) as refused:
                client.models.list()
            assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        missing = httpx.get(f"{server.url}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # stays open

        assert OpenAI(base_url=f"{server.url}/v1", api_key=deployed).models.list().data
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        assert client.models.list().data
        [record] = [r for r in store.records() if r.name == "tests"]
        assert store.revoke(record.id)
        with pytest.raises(AuthenticationError):
            client.models.list()


def test_open_endpoint_when_keys_are_switched_off(champion, tmp_path, store):
    registry = champion
    with serve(registry, tmp_path, store, require_key=False) as server:
        wait_for(lambda: ready(server.url), what="the model")
        assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_chat_logprobs_are_the_model_log_probabilities(champion, tiny_model, tmp_path, store, key):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = champion
    with serve(registry, tmp_path, store) as server:
        wait_for(lambda: ready(server.url), what="the model")
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        chat = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
            logprobs=True, top_logprobs=3,
        )
        with pytest.raises(BadRequestError, match="top_logprobs"):
            client.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": "x"}],
                                           top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt)])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = content[0]
    assert len(first.top_logprobs) == 3
    assert first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob >= first.top_logprobs[2].logprob
    assert math.isclose(first.logprob, float(expected.max()), abs_tol=1e-4)  # greedy: the chosen one is the best
    assert first.token == first.top_logprobs[0].token and first.bytes == list(first.token.encode())


def test_completions_score_token_id_prompts_like_lm_eval_sends_them(champion, tiny_model, tmp_path, store, key):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = champion
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    mixed = [1, *tokenizer("Café 🌍 at nine", add_special_tokens=False)["input_ids"], 2]  # 🌍 spans tokens
    ids = [[1, 504, 2618, 314, 253, 1345], [1, 504, 2618], [1, 2, 1], mixed]
    with serve(registry, tmp_path, store) as server:
        wait_for(lambda: ready(server.url), what="the model")
        r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
            "model": "nightshift-llm", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0,
        })
        assert r.status_code == 200, r.text
        # Streamed, the echo is the same text, control tokens included (it once left them out).
        with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
                "model": "nightshift-llm", "prompt": ids, "max_tokens": 0, "echo": True, "stream": True}) as streamed:
            echoed = {}
            for line in streamed.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        echoed[c["index"]] = echoed.get(c["index"], "") + (c["text"] or "")
        assert echoed == {i: tokenizer.decode(p) for i, p in enumerate(ids)}
        bad = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
            "model": "nightshift-llm", "prompt": [[1, 10**9]], "max_tokens": 0, "echo": True})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for prompt, choice in zip(ids, choices, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) and logprobs["token_logprobs"][0] is None
        with torch.no_grad():
            rows = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
        expected = [float(rows[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
        assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
        # The entries join to the echoed prompt exactly, its control tokens included, and each starts where
        # the text before it ends.
        assert "".join(logprobs["tokens"]) == choice["text"] == tokenizer.decode(prompt)
        assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(prompt))]
