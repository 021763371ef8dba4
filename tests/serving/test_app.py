import time

import httpx
import pytest
from openai import NotFoundError, OpenAI

from helpers import UvicornThread
from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.serving.app import create_app


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", "nightshift-llm", (tmp_path / "art").as_uri())


def publish(registry, checkpoint, key):
    run_id = registry.open_run("serving", key, key, {})
    registry.client.log_artifacts(run_id, str(checkpoint), "checkpoint")
    return registry.promote(registry.register(run_id, tags={"nightshift.dataset_tag": f"ds-{key}"}))


def test_no_champion_yet_is_a_503_not_a_crash(registry, tmp_path):
    with UvicornThread(create_app(registry, tmp_path / "cache", poll_seconds=0.2)) as server:
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["status"] == "no_model" and "alias" in health["detail"]
        r = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"model": "nightshift-llm", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "alias" in r.json()["error"]["message"]


def test_openai_client_talks_to_the_champion_and_sees_the_new_one_without_restart(registry, tiny_model, tmp_path):
    publish(registry, tiny_model, "one")
    with UvicornThread(create_app(registry, tmp_path / "cache", poll_seconds=0.2)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        assert [(m.id, m.version) for m in client.models.list().data] == [("nightshift-llm", 1)]

        chat = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
        )
        assert chat.system_fingerprint == "v1"
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens <= 5 and chat.choices[0].finish_reason in ("stop", "length")

        completion = client.completions.create(model="nightshift-llm", prompt="The sky", max_tokens=4)
        assert completion.system_fingerprint == "v1" and completion.usage.completion_tokens <= 4

        stream = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

        publish(registry, tiny_model, "two")  # the alias moves to v2 while the server runs
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/healthz").json()["version"] != 2:
            assert time.monotonic() < deadline, "server never picked up the new champion"
            time.sleep(0.2)
        chat = client.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2)
        assert chat.system_fingerprint == "v2"
        assert httpx.get(f"{server.url}/healthz").json()["dataset"] == "ds-two"


def test_bad_requests_get_openai_style_errors(registry, tiny_model, tmp_path):
    publish(registry, tiny_model, "one")
    with UvicornThread(create_app(registry, tmp_path / "cache", poll_seconds=60)) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nightshift-llm", "messages": []})
        assert r.status_code == 422
        r = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"model": "nightshift-llm", "n": 3, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "n > 1" in r.json()["error"]["message"]
