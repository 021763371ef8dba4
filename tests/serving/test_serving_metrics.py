"""GET /metrics in Prometheus' format, counted from real requests, and the JSON access log without content."""

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import BadRequestError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from helpers import UvicornThread, ready, wait_for
from nightshift.serving.app import create_app
from nightshift.serving.keys import KeyRing, KeyStore

SECRET_WORDS = "lighthouse-keeper-confidential"


@pytest.fixture
def served(tmp_path, champion):
    registry = champion
    store = KeyStore(tmp_path / "keys" / "api_keys.json")
    key = store.create("tests")[1]
    with UvicornThread(create_app(registry, tmp_path / "cache", keyring=KeyRing(store, recheck_seconds=0),
                                  poll_seconds=0.2)) as server:
        wait_for(lambda: ready(server.url), what="the model")
        yield server, key


def scrape(url: str, key: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_requests_tokens_errors_batches_and_versions(served, caplog):
    server, key = served
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    caplog.set_level(logging.INFO, logger="nightshift.serving.access")

    def ask(i):
        return client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": f"{SECRET_WORDS} {i}"}], max_tokens=6,
            temperature=0)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(8)))
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="nightshift-llm", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=10**6)
    assert httpx.get(f"{server.url}/metrics").status_code == 401

    m = scrape(server.url, key)
    chat = "/v1/chat/completions"
    assert m[("nightshift_requests_total", (("route", chat), ("status", "200")))] == 8
    assert m[("nightshift_requests_total", (("route", chat), ("status", "400")))] == 1
    assert m[("nightshift_request_errors_total", (("code", "context_length_exceeded"), ("route", chat)))] == 1
    # The 401 never reached a route: it is counted, under a bounded label.
    assert m[("nightshift_requests_total", (("route", "unmatched"), ("status", "401")))] == 1
    assert m[("nightshift_tokens_total", (("kind", "completion"), ("version", "1")))] == sum(
        a.usage.completion_tokens for a in answers)
    assert m[("nightshift_tokens_total", (("kind", "prompt"), ("version", "1")))] == sum(
        a.usage.prompt_tokens for a in answers)
    assert m[("nightshift_answers_total", (("role", "champion"), ("version", "1")))] == 8
    assert m[("nightshift_model_loaded", (("role", "champion"), ("version", "1")))] == 1
    assert m[("nightshift_request_seconds_count", (("route", chat),))] == 9
    assert m[("nightshift_queue_wait_seconds_count", ())] == 8
    assert m[("nightshift_batch_size_count", ())] > 0
    assert m[("nightshift_batch_size_sum", ())] > m[("nightshift_batch_size_count", ())], \
        "four concurrent requests never shared a decoding step"
    assert m[("nightshift_queue_depth", ())] == 0 and m[("nightshift_running_sequences", ())] == 0

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "nightshift.serving.access"]
    answered = [line for line in lines if line["route"] == chat and line["status"] == 200]
    assert len(answered) == 8
    assert {line["response_id"] for line in answered} == {a.id for a in answers}
    assert all(line["model_version"] == 1 and line["complete"] and line["key_id"] for line in answered)
    assert any(line.get("error") == "context_length_exceeded" for line in lines)
    assert SECRET_WORDS not in caplog.text
