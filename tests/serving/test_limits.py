"""Admission control (slots, queue, memory, deadlines) and the memory model of a request."""

import asyncio
import time

import pytest

from nightshift.serving.limits import MIB, Admission, ModelShape, fit_window
from nightshift.serving.protocol import OpenAIError
from nightshift.settings import ServingLimits

SMOLLM2 = ModelShape(layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152)


def later(seconds=30.0):
    return time.monotonic() + seconds


def test_a_full_queue_is_refused_with_retry_after_and_waiters_are_served_in_order():
    async def main():
        admission = Admission(slots=1, queue=2)
        first = await admission.acquire(1, 100, later())
        order: list[str] = []

        async def wait(name):
            ticket = await admission.acquire(1, 100, later())
            order.append(name)
            return ticket

        second = asyncio.create_task(wait("second"))
        third = asyncio.create_task(wait("third"))
        await asyncio.sleep(0.01)
        assert (admission.active, admission.waiting) == (1, 2)
        with pytest.raises(OpenAIError) as busy:
            await admission.acquire(1, 100, later())
        assert busy.value.status == 429 and int(busy.value.headers["Retry-After"]) >= 1
        first.release()
        first.release()  # a second release changes nothing
        (await second).release()
        (await third).release()
        assert order == ["second", "third"]
        assert (admission.active, admission.waiting, admission.bytes_in_use) == (0, 0, 0)

    asyncio.run(main())


def test_memory_holds_back_a_request_even_when_a_slot_is_free():
    async def main():
        admission = Admission(slots=4, queue=4)
        big = await admission.acquire(70, 100, later())
        waiting = asyncio.create_task(admission.acquire(40, 100, later()))
        await asyncio.sleep(0.01)
        assert not waiting.done() and admission.waiting == 1
        big.release()
        (await waiting).release()
        lone = await admission.acquire(500, 100, later())  # alone it always runs: the window was fitted to memory
        lone.release()

    asyncio.run(main())


def test_a_deadline_that_passes_in_the_queue_is_a_429_and_leaves_nothing_held():
    async def main():
        admission = Admission(slots=1, queue=4)
        held = await admission.acquire(1, 100, later())
        with pytest.raises(OpenAIError) as busy:
            await admission.acquire(1, 100, time.monotonic() + 0.05)
        assert busy.value.status == 429 and admission.waiting == 0
        cancelled = asyncio.create_task(admission.acquire(1, 100, later()))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        held.release()
        assert (admission.active, admission.waiting, admission.bytes_in_use) == (0, 0, 0)

    asyncio.run(main())


def test_request_memory_grows_with_context_and_matches_the_kv_cache_size():
    assert SMOLLM2.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    small, large = SMOLLM2.request_bytes(512, 512), SMOLLM2.request_bytes(8192, 512)
    assert small < large
    assert large > 2 * SMOLLM2.kv_bytes_per_token * 8192
    assert SMOLLM2.request_bytes(8192, 512, all_logits=True) > large


def test_the_window_shrinks_to_what_the_budget_holds():
    assert fit_window(SMOLLM2, 8192, 512, 8 * 1024 * MIB) == 8192
    fitted = fit_window(SMOLLM2, 8192, 512, 600 * MIB)
    assert 0 < fitted < 8192
    assert SMOLLM2.request_bytes(fitted, 512, True) <= 600 * MIB < SMOLLM2.request_bytes(fitted + 1, 512, True)


def test_limits_name_the_setting_to_change():
    with pytest.raises(ValueError, match="NIGHTSHIFT_SERVE_MAX_CONCURRENT"):
        ServingLimits(max_concurrent=0)
    with pytest.raises(ValueError, match="NIGHTSHIFT_SERVE_MEMORY_MB"):
        ServingLimits(memory_budget_mb=10)


def test_requests_in_flight_are_bounded_and_probes_are_answered_outside_the_bound():
    import asyncio

    from nightshift.serving.connections import InFlightMiddleware

    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["path"] == "/v1/chat/completions":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(middleware, path):
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await middleware({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario():
        middleware = InFlightMiddleware(app, bound=2)
        held = [asyncio.ensure_future(call(middleware, "/v1/chat/completions")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call(middleware, "/v1/chat/completions")
        probes = [await call(middleware, path) for path in ("/livez", "/healthz", "/metrics")]
        release.set()
        done = await asyncio.gather(*held)
        again = await call(middleware, "/v1/chat/completions")
        return refused, probes, done, again, middleware.in_flight

    refused, probes, done, again, in_flight = asyncio.run(scenario())
    assert refused[0] == 503 and refused[1][b"retry-after"] == b"1"
    assert [status for status, _ in probes] == [200, 200, 200]
    assert [status for status, _ in done] == [200, 200] and again[0] == 200 and in_flight == 0
