"""Route handlers, thin: each picks a target and awaits its answer, or reads the server's state.

``/v1/chat/completions`` and ``/v1/completions`` check the request's options (``protocol.check_supported``),
pick the target and role (``server.Server.pick``: champion, canary candidate, or an engine upstream) and await
``target.answer``; what follows an answer (request log, shadow, metrics) is ``afterwork.answered``. Probes
(``/livez``, ``/healthz``, ``/metrics``) are answered outside the in-flight bound (``connections.py``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nightshift.serving.context import note, server_of
from nightshift.serving.loading import LoadedModel
from nightshift.serving.metrics import CONTENT_TYPE
from nightshift.serving.protocol import ChatRequest, CompletionRequest, FeedbackRequest, OpenAIError, check_supported
from nightshift.serving.requestlog import UnknownResponse
from nightshift.serving.retrieval import EmbeddingRequest
from nightshift.serving.server import Server

log = logging.getLogger(__name__)

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, req: ChatRequest) -> Response:
    return await _answer(request, req, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, req: CompletionRequest) -> Response:
    return await _answer(request, req, chat=False)


async def _answer(request: Request, req, chat: bool) -> Response:
    server = server_of(request)
    rag = server.retrieval_asked(req, chat)
    rag_options = (req.model_extra or {}).pop("rag", None) if rag else None
    check_supported(req)
    target, role = server.pick(request, req)
    server.prompt_for(request, req)
    if rag:
        assert server.retrieval is not None
        await server.retrieval.ground(request, req, target, rag_options)
    return await target.answer(request, req, chat=chat, role=role)


@router.post("/v1/embeddings")
async def embeddings(request: Request, req: EmbeddingRequest) -> JSONResponse:
    """OpenAI's embeddings: vectors of the corpus index's model for texts or token ids (serving/retrieval.py)."""
    server = server_of(request)
    if server.retrieval is None:
        raise OpenAIError(404, "Embeddings are off on this endpoint.", code="not_found")
    return JSONResponse(await server.retrieval.embeddings(request, req))


@router.post("/v1/feedback", status_code=201)
async def post_feedback(request: Request, body: FeedbackRequest) -> JSONResponse:
    """Rate one of this key's answers (-1, 0, 1), optionally with a correction and a comment."""
    server = server_of(request)
    if server.request_log is None:
        raise OpenAIError(503, "Feedback is off: this endpoint runs without a request log "
                          "(NIGHTSHIFT_SERVE_REQUEST_LOG).", code="feedback_disabled")
    key_id = request.scope.get("state", {}).get("key_id")
    try:
        stored = await server.on_database(server.request_log.add_feedback, body.response_id, key_id, body.rating,
                                          body.correction, body.comment, datetime.now(UTC))
    except UnknownResponse:
        raise OpenAIError(404, "No answer with this response_id was given to this API key (or it is older than the "
                          "log's retention).", param="response_id", code="response_not_found") from None
    note(request, response_id=body.response_id)
    server.metrics.feedback.labels(str(body.rating), str(stored["model_version"])).inc()
    return JSONResponse(stored, 201)


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Readiness: 200 only while a model is loaded and no swap is under way."""
    server = server_of(request)
    watcher = server.watcher
    loaded = watcher.current
    state = watcher.state
    admission = server.admission
    # With a prompt to apply, ready also means its production version was read once (serving/prompting.py).
    prompt_ready = server.prompts is None or server.prompts.ready
    body = {
        "status": state, "ready": state == "ready" and prompt_ready, "model": server.model_name,
        "version": loaded.record.version if loaded else None,
        "dataset": loaded.record.dataset_tag if loaded else None,
        "window": loaded.window if loaded else None,
        "loading": watcher.loading, "detail": watcher.detail,
        "active": admission.active if admission else 0, "waiting": admission.waiting if admission else 0,
        "rollout": _rollout_info(server),
        "prompt": server.prompts.info() if server.prompts else None,
        "memory": _memory(server, loaded),
        "request_log": ({"written": server.request_log.written, "failed": server.request_log.failed,
                         "dropped": server.request_log.dropped} if server.request_log is not None else None),
    }
    return JSONResponse(body, 200 if state == "ready" and prompt_ready else 503)


def _memory(server: Server, loaded: LoadedModel | None) -> dict[str, int] | None:
    """What requests are charged and what the batches' caches hold, in bytes (never more than charged)."""
    admission, scheduler = server.admission, server.scheduler
    if not isinstance(loaded, LoadedModel) or admission is None or scheduler is None:
        return None  # on the upstream path the engine holds the memory
    return {"capacity": loaded.capacity_bytes, "charged": admission.bytes_in_use + scheduler.padding_bytes,
            "padding_charged": scheduler.padding_bytes, "kv_held": scheduler.kv_held_bytes,
            "kv_held_peak": scheduler.kv_held_peak_bytes, "over_charge_peak": scheduler.over_charge_peak_bytes}


def _rollout_info(server: Server) -> dict[str, Any] | None:
    active = server.candidate.active() if server.candidate else None
    if active is None:
        return None
    rollout, loaded = active
    return {"candidate": loaded.record.version, "mode": rollout.mode, "share": rollout.share}


@router.get("/livez")
def livez() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "alive"}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus exposition: requests, errors, latency, tokens, queue depth, batch sizes, versions loaded."""
    server = server_of(request)
    loaded = server.watcher.current
    candidate = server.candidate.current if server.candidate else None
    server.metrics.set_loaded({"champion": loaded.record.version if loaded else None,
                               "candidate": candidate.record.version if candidate else None})
    return Response(server.metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
def models(request: Request) -> dict[str, Any]:
    server = server_of(request)
    loaded = server.watcher.current
    data = []
    if loaded:
        data.append({
            "id": server.model_name, "object": "model", "created": int(loaded.loaded_at), "owned_by": "nightshift",
            "version": loaded.record.version, "alias": server.alias, "dataset": loaded.record.dataset_tag,
            "max_model_len": loaded.window,
        })
    return {"object": "list", "data": data}


@router.get("/v1/champion/history")
def champion_history(request: Request, at: str | None = None) -> dict[str, Any]:
    """Every recorded move of the champion alias; with ``at`` (ISO 8601) also which version was champion then."""
    from nightshift.registry.history import PromotionHistory, parse_time

    server = server_of(request)
    when = None
    if at is not None:
        try:
            when = parse_time(at[:64])
        except ValueError as exc:
            raise OpenAIError(400, f"`at`: {exc}", param="at", code="invalid_value") from None
    history = PromotionHistory(server.watcher.registry)
    try:
        moves = history.moves()
        body: dict[str, Any] = {"model": server.model_name, "alias": server.alias,
                                "moves": [m.to_dict() for m in moves]}
        if when is not None:
            body.update({"at": when.isoformat(), "champion": history.champion_at(when)})
    except Exception as exc:  # the registry may be briefly unavailable
        log.warning("promotion history unavailable: %s", type(exc).__name__)
        raise OpenAIError(503, "The model registry is unavailable; try again.", code="registry_unavailable",
                          headers={"Retry-After": "5"}) from None
    return body
