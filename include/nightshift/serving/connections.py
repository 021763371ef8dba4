"""Connections and in-flight requests: what an idle or slow client may hold, and what it may not.

uvicorn's own bound (``limit_concurrency``) counts open connections, idle ones included, and an idle socket
that never sends a byte is never timed out: 160 such sockets, no key needed, made every route answer 503,
the liveness probe too. Here instead:

- ``HeaderTimeoutProtocol``: uvicorn's httptools protocol with a deadline for a request's headers. A socket
  opened and left idle, or one dripping its headers, is closed ``header_timeout_s`` after it opened (or after
  its next request began); between requests uvicorn's keep-alive timeout applies as before.
- ``InFlightMiddleware``: a bound on requests being handled, not on sockets. Beyond it a request gets 503 with
  Retry-After; the probes (``/livez``, ``/healthz``, ``/metrics``) are answered outside the bound, so an
  orchestrator never restarts a healthy pod because clients are many. A client that stops reading its answer
  (its socket buffer full, every write waiting) keeps its place only ``send_timeout_s`` per write; then its
  connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nightshift.serving.protocol import send_error

log = logging.getLogger(__name__)

PROBES = frozenset({"/livez", "/healthz", "/metrics"})


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers do not arrive in time."""

    header_timeout_s = 10.0
    """Set by ``protocol_class``."""

    _header_deadline: TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:  # a further request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """Return the protocol to hand uvicorn (``http=``), with this deadline for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})


class ClientStopsReading(Exception):
    """A write to the client waited longer than the send timeout: its connection is closed."""


class InFlightMiddleware:
    """Answer 503 (Retry-After) to requests beyond ``bound`` being handled at once; probes are never counted."""

    def __init__(self, app, bound: int, send_timeout_s: float = 10.0) -> None:
        self.app = app
        self.bound = bound
        self.send_timeout_s = send_timeout_s
        self.in_flight = 0
        self.refused = 0
        self.stalled = 0
        """Connections closed because their client stopped reading."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.bound:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%d requests refused so far: %d already in flight (NIGHTSHIFT_SERVE_MAX_IN_FLIGHT)",
                            self.refused, self.in_flight)
            await send_error(send, 503, f"The server is handling {self.bound} requests; retry shortly.",
                             "server_busy", {"Retry-After": "1"})
            return
        self.in_flight += 1

        async def send_in_time(message) -> None:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                self.stalled += 1
                if self.stalled == 1 or self.stalled % 100 == 0:
                    log.warning("%d connections closed so far: their clients stopped reading for %.0f s",
                                self.stalled, self.send_timeout_s)
                raise ClientStopsReading from None

        try:
            await self.app(scope, receive, send_in_time)
        finally:
            self.in_flight -= 1
