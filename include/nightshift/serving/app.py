"""OpenAI-compatible REST endpoint serving the registry's champion, hot-swapped when the alias moves.

Routes: ``GET /healthz`` (readiness), ``GET /livez``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/champion/history[?at=<ISO time>]`` (the promotion history, and which version was champion at a
time). Everything under ``/v1`` and ``/metrics`` needs an API
key. The answering version is in ``system_fingerprint`` (``v<N>``) and the ``X-Nightshift-Model-Version``
header; every response carries an ``X-Request-Id``, and one JSON access-log line per request records it with
the key id, the route, the model version, token counts and timings, never the content.

The pieces, outermost first: request id and access log, the bound on requests in flight (probes excepted,
``connections.py``), body-size limit and time, API key, then thin route handlers (``routes.py``) that pick a
target (``server.py``) and await its answer: ``local.py`` (prompts, plan, admission in ``limits.py``, the
continuous batch in ``batching.py``, decoding in ``decoding.py``, streaming) or ``relay.py`` (an
OpenAI-compatible engine upstream). Response shapes are in ``responses.py``; what follows every answer
(request log, shadow, metrics) in ``afterwork.py``; models are loaded by ``loading.py`` and kept current by
``watching.py``; ``metrics.py`` counts and logs every request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.serving.canary import CandidateWatcher
from nightshift.serving.connections import ClientStopsReading, InFlightMiddleware
from nightshift.serving.keys import ApiKeyMiddleware, KeyRing
from nightshift.serving.limits import BodyLimitMiddleware
from nightshift.serving.loading import import_libraries
from nightshift.serving.metrics import ServingMetrics, log_access, route_of
from nightshift.serving.prompting import PromptWatcher
from nightshift.serving.protocol import OpenAIError, error_body, error_type, send_error, validation_message
from nightshift.serving.requestlog import RequestLog
from nightshift.serving.retrieval import ServingRetrieval
from nightshift.serving.routes import router
from nightshift.serving.server import Server
from nightshift.serving.watching import ChampionWatcher
from nightshift.settings import ServingLimits

log = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Give every request an id (``X-Request-Id``); when its response ends, count it and write its access-log line."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started)
        status = {"code": 0, "done": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                status["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientStopsReading:  # counted and logged where it happened; uvicorn closes the connection
            state["error"] = "client_stopped_reading"
        except Exception as exc:
            # Answered here rather than by Starlette's ServerErrorMiddleware, which re-raises after its 500 so
            # that uvicorn closes the connection and resets the client's next request on it. Once a response
            # has started (a stream) there is nothing to answer with, and the connection must close.
            if status["code"]:
                raise
            log.error("request %s failed: %s", request_id, type(exc).__name__, exc_info=exc)
            await send_error(send_with_id, 500, "The server had an error while processing your request.", None, {})
        finally:
            seconds = time.monotonic() - started
            route = route_of(scope)
            try:
                self.metrics.observe(route, status["code"], seconds, state)
            except Exception:
                log.exception("could not count request %s", request_id)
            log_access(request_id, scope["method"], route, status["code"], status["done"], seconds, state)


def create_app(
    registry: ModelRegistry, cache_dir: Path, limits: ServingLimits | None = None, keyring: KeyRing | None = None,
    require_key: bool = True, poll_seconds: float = 5.0,
    on_alert: Callable[[str, str, str], None] | None = None, request_log: RequestLog | None = None,
    upstreams: dict[str, str] | None = None, prompts: PromptWatcher | None = None,
    retrieval: ServingRetrieval | None = None,
) -> FastAPI:
    """Return the FastAPI application serving ``registry``'s champion within ``limits``, behind ``keyring``.

    With ``upstreams`` (``{"champion": url, "candidate": url}``, OpenAI-compatible engines such as vLLM),
    generation is theirs; keys, limits, rollouts, the request log and metrics stay here. ``prompts``: the prompt
    template applied to chat requests (serving/prompting.py); None: the chat template alone. ``retrieval``:
    /v1/embeddings and ``+rag`` answers (serving/retrieval.py); None: both are off.
    """
    limits = limits or ServingLimits()
    candidate: CandidateWatcher | None
    if upstreams:  # the GPU engine path: vLLM generates, nightshift fronts it
        from nightshift.serving.upstream import UpstreamCandidateWatcher, UpstreamChampionWatcher

        watcher = UpstreamChampionWatcher(upstreams["champion"], registry, cache_dir, limits, poll_seconds, on_alert)
        candidate = (UpstreamCandidateWatcher(upstreams["candidate"], registry, cache_dir / "candidate", limits,
                                              poll_seconds, on_alert) if upstreams.get("candidate") else None)
    else:
        import_libraries()  # here, before the watchers' threads, never lazily in two of them at once
        watcher = ChampionWatcher(registry, cache_dir, limits, poll_seconds, on_alert)
        candidate = CandidateWatcher(registry, cache_dir / "candidate", limits, poll_seconds, on_alert)
        watcher.donor, candidate.taker = candidate, watcher  # a promoted candidate is served at once, not reloaded
    metrics = ServingMetrics()
    server = Server(watcher=watcher, limits=limits, model_name=registry.model_name, alias=registry.alias,
                    metrics=metrics, request_log=request_log, candidate=candidate, prompts=prompts,
                    retrieval=retrieval)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.start()
        if prompts is not None:
            prompts.start()
        watcher.start()
        if candidate is not None:
            candidate.start()
        yield
        if candidate is not None:
            candidate.stop()
        watcher.stop()
        if prompts is not None:
            prompts.stop()
        await server.close()
        server.stop()

    # No /docs, /redoc or /openapi.json: they would answer without a key, and /docs loads its scripts from a CDN.
    # The routes are described in the module docstring above and in docs/serving.md.
    app = FastAPI(title="nightshift serving", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.include_router(router)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        request.scope.setdefault("state", {})["error"] = exc.code or exc.status
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = ("Unknown route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings and "
                       "/v1/champion/history.")
        return JSONResponse(error_body(message, error_type(exc.status_code)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    # add_middleware wraps: the last added runs first.
    app.add_middleware(ApiKeyMiddleware, keyring=keyring or KeyRing(), required=require_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, body_timeout_s=limits.header_timeout_s)
    app.add_middleware(InFlightMiddleware, bound=limits.in_flight_bound, send_timeout_s=limits.header_timeout_s)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
