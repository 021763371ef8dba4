"""A bounded load test against `nightshift serve` on 127.0.0.1: no errors within the bound, 429s beyond it, and
no request lost or answered by a half-loaded model while the champion is hot-swapped under load."""

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest

from helpers import ServeProcess, greedy_answers, home_registry, perturbed_copy, publish

SLOTS, QUEUE = 4, 4
PROMPTS = ["The harbour opens at", "Tide tables say", "The keeper writes", "Ferries leave when"]
MAX_TOKENS = 12


@pytest.fixture
def perturbed_model(tiny_model, tmp_path):
    return perturbed_copy(tiny_model, tmp_path / "v2")


async def fire(url: str, n: int, concurrency: int, results: list) -> None:
    """Send ``n`` completions with at most ``concurrency`` in flight; record (status, version, prompt, text)."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            async with gate:
                r = await client.post("/v1/completions", json={
                    "model": "nightshift-llm", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            body = r.json()
            text = body["choices"][0]["text"] if r.status_code == 200 else body["error"]["code"]
            results.append((r.status_code, r.headers.get("x-nightshift-model-version"), prompt, text,
                            r.headers.get("retry-after")))

        await asyncio.gather(*(one(i) for i in range(n)))


def test_load_within_and_beyond_the_bound_and_a_hot_swap_under_load(tmp_path, monkeypatch, tiny_model,
                                                                    perturbed_model):
    from nightshift.settings import load_settings

    home = tmp_path / "home"
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(home))
    registry = home_registry(load_settings())
    publish(registry, tiny_model, "v1")
    v2 = publish(registry, perturbed_model, "v2", promote=False)
    expected = {"1": greedy_answers(tiny_model, PROMPTS, MAX_TOKENS),
                "2": greedy_answers(perturbed_model, PROMPTS, MAX_TOKENS)}
    assert expected["1"] != expected["2"]
    env = {"NIGHTSHIFT_SERVE_REQUIRE_KEY": "false", "NIGHTSHIFT_SERVE_MAX_CONCURRENT": str(SLOTS),
           "NIGHTSHIFT_SERVE_MAX_QUEUE": str(QUEUE)}
    with ServeProcess(home, env) as server:
        # Within the bound (slots + queue): every request answered, by v1, correctly.
        within: list = []
        asyncio.run(fire(server.url, 64, SLOTS + QUEUE, within))
        assert Counter(r[0] for r in within) == {200: 64}
        assert all(text == expected["1"][prompt] for _, _, prompt, text, _ in within)

        # Beyond it: the excess gets 429 with Retry-After, nothing else fails, nothing is lost.
        beyond: list = []
        asyncio.run(fire(server.url, 48, 48, beyond))
        statuses = Counter(r[0] for r in beyond)
        assert set(statuses) == {200, 429} and sum(statuses.values()) == 48, statuses
        assert statuses[429] > 0 and statuses[200] >= SLOTS + QUEUE
        assert all(r[4] and int(r[4]) >= 1 for r in beyond if r[0] == 429)
        assert all(r[3] == "server_busy" for r in beyond if r[0] == 429)
        print(f"beyond the bound: {statuses[200]} answered, {statuses[429]} refused with 429 of 48 sent at once")

        # Hot swap under load: promote v2 while requests keep coming; each answer is whole from one version.
        swapped: list = []
        loader = threading.Thread(target=lambda: asyncio.run(fire(server.url, 400, SLOTS + QUEUE, swapped)))
        loader.start()
        time.sleep(1.0)
        registry.promote(v2)
        loader.join(timeout=600)
        assert not loader.is_alive()
        assert Counter(r[0] for r in swapped) == {200: 400}, Counter(r[0] for r in swapped)
        versions = Counter(r[1] for r in swapped)
        assert versions["1"] > 0 and versions["2"] > 0, f"the swap did not happen under load: {versions}"
        wrong = [r for r in swapped if r[3] != expected[r[1]][r[2]]]
        assert not wrong, f"{len(wrong)} answers do not match the version that claims them"
        assert "serving nightshift-llm v2" in server.log()
        print(f"hot swap under load: 400 of 400 answered ({versions['1']} by v1, {versions['2']} by v2), 0 mismatched")
