"""Canary and shadow rollouts through the real endpoint: the split, stickiness, shadow answers only logged,
rollback to the champion for all traffic, and a promoted candidate served without reloading."""

import asyncio
import time
from collections import Counter

import httpx
import pytest

from helpers import UvicornThread, greedy_answers, local_registry, perturbed_copy, publish, ready, wait_for
from nightshift.registry.rollout_state import Rollouts
from nightshift.serving.app import create_app
from nightshift.serving.requestlog import RequestLog

PROMPTS = ["The harbour opens at", "Tide tables say", "The keeper writes", "Ferries leave when"]
MAX_TOKENS = 8


@pytest.fixture
def setup(tmp_path, tiny_model):
    registry = local_registry(tmp_path)
    v1 = publish(registry, tiny_model, "v1")
    v2_folder = perturbed_copy(tiny_model, tmp_path / "v2")
    v2 = publish(registry, v2_folder, "v2", promote=False)
    expected = {"1": greedy_answers(tiny_model, PROMPTS, MAX_TOKENS),
                "2": greedy_answers(v2_folder, PROMPTS, MAX_TOKENS)}
    request_log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    app = create_app(registry, tmp_path / "cache", require_key=False, poll_seconds=0.2, request_log=request_log)
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion")
        server.app_state = app.state
        yield server, registry, v1, v2, expected, request_log


def rollout_state(url):
    return httpx.get(f"{url}/healthz").json()["rollout"]


async def ask(url: str, users: list[str], concurrency: int = 8) -> list[tuple[str, str, str, str, str]]:
    """One completion per user; return (user, version, role, prompt, text) for each."""
    gate = asyncio.Semaphore(concurrency)
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int, user: str) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            async with gate:
                r = await client.post("/v1/completions", json={
                    "model": "nightshift-llm", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "user": user})
            assert r.status_code == 200, r.text
            assert r.json()["system_fingerprint"] == f"v{r.headers['x-nightshift-model-version']}"
            out.append((user, r.headers["x-nightshift-model-version"], r.headers["x-nightshift-model-role"], prompt,
                        r.json()["choices"][0]["text"]))

        await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    return out


def test_canary_split_is_within_tolerance_sticky_and_rollback_restores_the_champion(setup):
    server, registry, v1, v2, expected, _log = setup
    rollouts = Rollouts(registry)
    rollouts.start(v2, "canary", 0.3)
    wait_for(lambda: rollout_state(server.url), what="the candidate to load")
    users = [f"user-{i}" for i in range(400)]
    answers = asyncio.run(ask(server.url, users))
    share = Counter(a[1] for a in answers)["2"] / len(answers)
    assert abs(share - 0.3) < 0.07, share  # 3.5 standard deviations of a binomial share at n=400
    assert {a[2] for a in answers if a[1] == "2"} == {"candidate"}
    assert all(text == expected[version][prompt] for _, version, _, prompt, text in answers)
    first = {user: version for user, version, *_ in answers}
    again = asyncio.run(ask(server.url, users[:100]))
    assert all(first[user] == version for user, version, *_ in again), "a user changed version within the step"

    rollouts.set_share(v2, 0.6)  # a larger share only adds users
    wait_for(lambda: (rollout_state(server.url) or {}).get("share") == 0.6, what="the new share")
    wider = asyncio.run(ask(server.url, users))
    assert all(version == "2" for user, version, *_ in wider if first[user] == "2")
    assert abs(Counter(a[1] for a in wider)["2"] / len(wider) - 0.6) < 0.07

    rollouts.end(v2, "rolled_back")
    wait_for(lambda: rollout_state(server.url) is None, what="the rollback")
    after = asyncio.run(ask(server.url, users[:200]))
    assert Counter(a[1] for a in after) == {"1": 200}
    assert registry.version_tags(v2.version)["nightshift.rollout.state"] == "rolled_back"


def test_shadow_never_returns_the_candidates_answer_and_logs_it_beside_the_champions(setup):
    server, registry, v1, v2, expected, request_log = setup
    Rollouts(registry).start(v2, "shadow", 0.5)  # a share means nothing in shadow mode
    wait_for(lambda: rollout_state(server.url), what="the shadow candidate")
    assert rollout_state(server.url) == {"candidate": 2, "mode": "shadow", "share": 0.0}
    ids = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(12):
            prompt = PROMPTS[i % len(PROMPTS)]
            r = client.post("/v1/completions", json={"model": "nightshift-llm", "prompt": prompt,
                                                     "max_tokens": MAX_TOKENS, "temperature": 0, "user": f"u{i}"})
            assert r.headers["x-nightshift-model-version"] == "1"
            assert r.json()["choices"][0]["text"] == expected["1"][prompt]
            ids.append((r.json()["id"], prompt))
            time.sleep(0.1)  # leave a slot free, as a shadow needs

    def shadows_logged():
        return all(request_log.answer(f"{rid}-shadow") for rid, _ in ids)

    wait_for(shadows_logged, what="the shadow answers in the request log")
    for rid, prompt in ids:
        champion, shadow = request_log.answer(rid), request_log.answer(f"{rid}-shadow")
        assert (champion["model_version"], champion["model_role"]) == (1, "champion")
        assert (shadow["model_version"], shadow["model_role"]) == (2, "shadow")
        assert shadow["answer"] == [expected["2"][prompt]] and champion["answer"] == [expected["1"][prompt]]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'nightshift_shadow_requests_total{outcome="answered"} 12.0' in metrics

    # A shadow answer holds a slot and its memory like any request (it once went straight to the batch while
    # admission showed nothing in use).
    state = server.app_state.server
    many = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "nightshift-llm", "prompt": [PROMPTS[0]] * 32, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert many.status_code == 200
    seen = []

    def logged():
        seen.append((state.shadows, state.admission.active, state.admission.bytes_in_use))
        return request_log.answer(f"{many.json()['id']}-shadow")

    assert len(wait_for(logged, what="the 32-prompt shadow answer", every=0.005)["answer"]) == 32
    assert any(shadows and active and used > 0 for shadows, active, used in seen), seen[:5]
    assert state.admission.active == 0 and state.admission.bytes_in_use == 0


def test_a_promoted_candidate_is_served_at_once_without_reloading(setup):
    server, registry, v1, v2, expected, _log = setup
    rollouts = Rollouts(registry)
    rollouts.start(v2, "canary", 0.1)
    wait_for(lambda: rollout_state(server.url), what="the candidate")
    candidate = server.app_state.server.candidate.current
    registry.promote(v2)
    rollouts.end(v2, "promoted")
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["version"] == 2, what="v2 as champion")
    assert server.app_state.server.watcher.current is candidate  # the same weights in memory, not loaded again
    wait_for(lambda: server.app_state.server.candidate.current is None, what="the candidate slot to empty")
    answers = asyncio.run(ask(server.url, [f"u{i}" for i in range(40)]))
    assert Counter(a[1] for a in answers) == {"2": 40}
    assert {a[2] for a in answers} == {"champion"}
