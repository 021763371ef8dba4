"""What one request may cost: body size, tokens, generation slots, queue, time and memory.

All of it is checked before any model work. The body limit is an ASGI middleware (it runs before JSON
parsing); the slots, the wait queue and the memory budget are one admission controller, so a burst of
requests waits in a bounded queue or gets a 429 with ``Retry-After`` instead of piling up in memory.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nightshift.serving.protocol import OpenAIError, send_error

MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide what a request costs in memory."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 4

    @classmethod
    def of(cls, config) -> ModelShape:
        heads = int(getattr(config, "num_attention_heads", 1))
        hidden = int(getattr(config, "hidden_size", 0))
        return cls(
            layers=int(getattr(config, "num_hidden_layers", 1)), heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // max(heads, 1)), hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
            vocab=int(getattr(config, "vocab_size", 0)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def request_bytes(self, total_tokens: int, chunk: int, all_logits: bool = False) -> int:
        """Return an upper estimate of the memory one request needs at ``total_tokens`` of context.

        The KV cache is counted twice (a layer's cache is copied as it grows), attention scores for one
        prefill chunk against the whole context twice (scores and softmax), the MLP of one chunk, and the
        logits of one chunk (all of them only when prompt log-probabilities are asked for). Checked against
        the measured peak in tests/serving/test_hostile.py.
        """
        chunk = min(chunk, total_tokens)
        b = self.dtype_bytes
        kv = 2 * self.kv_bytes_per_token * total_tokens
        attention = 2 * self.heads * chunk * total_tokens * b
        mlp = 3 * chunk * (self.intermediate + self.hidden) * b
        logits = (chunk if all_logits else 1) * self.vocab * b * 3
        return kv + attention + mlp + logits + 16 * MIB


def fit_window(shape: ModelShape, window: int, chunk: int, available_bytes: int) -> int:
    """Return the largest context window (<= ``window``) whose worst-case request fits ``available_bytes``."""
    if shape.request_bytes(window, chunk, all_logits=True) <= available_bytes:
        return window
    lo, hi = 0, window
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shape.request_bytes(mid, chunk, all_logits=True) <= available_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 before anything parses them.

    The body is read here (never more than the limit is kept) and replayed to the application. An oversized
    body is drained up to ``drain_factor`` times the limit without being stored, so that a client still
    writing its request reads the 413 instead of a reset connection; beyond that the connection is closed.
    """

    def __init__(self, app, max_bytes: int, drain_factor: int = 16, body_timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max_bytes * drain_factor
        self.body_timeout_s = body_timeout_s
        """The whole body must arrive within this time of the headers: a client dripping it would otherwise hold
        an in-flight slot for as long as it likes."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.drain_bytes:
            await self._refuse(send, declared)
            return
        body = bytearray()
        seen = 0
        more = True
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await send_error(send, 408, f"The request body did not arrive within {self.body_timeout_s:.0f} s "
                                 "of its headers (NIGHTSHIFT_SERVE_HEADER_TIMEOUT_S).", "request_timeout",
                                 {"Connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen <= self.max_bytes:
                body += chunk
            elif seen > self.drain_bytes:
                break
            more = message.get("more_body", False)
        if seen > self.max_bytes:
            await self._refuse(send, seen)
            return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        message = (f"Request body too large: {size} bytes; this endpoint accepts at most {self.max_bytes} bytes "
                   "(NIGHTSHIFT_SERVE_MAX_BODY_BYTES).")
        await send_error(send, 413, message, "request_too_large", {"Connection": "close"})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Admission:
    """Generation slots, a bounded FIFO wait queue and a memory budget, for one event loop.

    ``acquire`` returns at once when a slot and the memory are free, waits in the queue otherwise, and raises
    a 429 (with ``Retry-After``) when the queue is full or the request's deadline passes while it waits.
    """

    def __init__(self, slots: int, queue: int, reserved: Callable[[], int] = lambda: 0) -> None:
        self.slots = slots
        self.queue = queue
        self.reserved = reserved
        """Bytes charged outside the tickets (the padding of running batches, batching.BatchScheduler)."""
        self.active = 0
        self.bytes_in_use = 0
        self._waiters: deque[tuple[asyncio.Future, int, int]] = deque()
        self._recent_seconds = 5.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Return the seconds a refused client should wait: the queue ahead of it at the recent pace."""
        ahead = (self.active + len(self._waiters)) / max(self.slots, 1)
        return max(1, min(60, math.ceil(self._recent_seconds * max(ahead, 1))))

    def _fits(self, cost: int, capacity: int) -> bool:
        # A lone request always runs: the window was fitted to the budget when the model was loaded.
        return self.active < self.slots and (self.active == 0 or self.bytes_in_use + self.reserved() + cost <= capacity)

    def free(self, capacity: int) -> int:
        """Return the bytes of ``capacity`` not charged to tickets or padding."""
        return capacity - self.bytes_in_use - self.reserved()

    def try_acquire(self, cost: int, capacity: int) -> Ticket | None:
        """Return a ticket at once when a slot and the memory are free and nobody waits; None otherwise (for
        work that is skipped rather than queued, such as a shadow answer)."""
        if not self._waiters and self._fits(cost, capacity):
            return self._admit(cost)
        return None

    async def acquire(self, cost: int, capacity: int, deadline: float) -> Ticket:
        if not self._waiters and self._fits(cost, capacity):
            return self._admit(cost)
        if len(self._waiters) >= self.queue:
            raise self._busy(f"The server is busy: {self.active} generations running and {len(self._waiters)} "
                             "waiting (the most it queues). Retry after the time in Retry-After.")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (future, cost, capacity)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise self._busy(
                "The server is busy: no generation slot became free before this request's timeout.") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return future.result()

    def _admit(self, cost: int) -> Ticket:
        self.active += 1
        self.bytes_in_use += cost
        return Ticket(self, cost, time.monotonic())

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.active -= 1
        self.bytes_in_use -= ticket.cost
        self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * (time.monotonic() - ticket.started)
        self.wake()

    def wake(self) -> None:
        """Admit the waiters at the head of the queue that fit now."""
        while self._waiters:
            future, cost, capacity = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if not self._fits(cost, capacity):
                break
            self._waiters.popleft()
            future.set_result(self._admit(cost))

    def _busy(self, message: str) -> OpenAIError:
        return OpenAIError(429, message, code="server_busy", headers={"Retry-After": str(self.retry_after())})


@dataclass
class Ticket:
    """A held generation slot; release it exactly once (``Admission.release`` ignores a second call)."""

    admission: Admission
    cost: int
    started: float
    released: bool = False

    def release(self) -> None:
        self.admission.release(self)
