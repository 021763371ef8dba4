"""Route handlers: turn an OpenAI request into prompts and sampling parameters, admit it, run it, answer it.

Every limit is checked before the model runs: options (protocol.check_supported), the model name, token
ids, the context window, then a generation slot (limits.Admission). Admitted prompts join the continuous
batch (batching.BatchScheduler); a client that disconnects or a request whose deadline passes stops its
sequences within one token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from nightshift.registry.rollout import CANDIDATE_ALIAS
from nightshift.serving.batching import BatchScheduler
from nightshift.serving.engine import (
    ChampionWatcher,
    GenerationResult,
    LoadedModel,
    SamplingParams,
    Sequence,
    TokenLogprob,
)
from nightshift.serving.limits import Admission, ServingLimits, Ticket
from nightshift.serving.metrics import CONTENT_TYPE, ServingMetrics
from nightshift.serving.protocol import (
    MAX_PROMPTS,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    OpenAIError,
    check_supported,
)
from nightshift.serving.requestlog import LoggedAnswer, RequestLog, UnknownResponse
from nightshift.serving.rollout import CandidateWatcher, routes_to_candidate
from nightshift.serving.upstream import UpstreamModel

log = logging.getLogger(__name__)

router = APIRouter()

DATABASE_THREADS = 2
DATABASE_PENDING = 16
DATABASE_TIMEOUT_S = 5.0


@dataclass
class Server:
    """What the handlers share: the champion, the limits, the admission controller and the batch scheduler."""

    watcher: ChampionWatcher
    limits: ServingLimits
    model_name: str
    alias: str
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    request_log: RequestLog | None = None
    candidate: CandidateWatcher | None = None
    shadows: int = 0
    """Shadow generations in flight."""
    _client: Any = None

    def upstream_client(self):
        """The HTTP client of the engine path (one connection pool for the server's life)."""
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.limits.max_concurrent * 2 + 4)
            self._client = httpx.AsyncClient(limits=limits)
        return self._client
    admission: Admission | None = None
    scheduler: BatchScheduler | None = None
    database: ThreadPoolExecutor | None = None
    """The request log's own threads: a slow or locked database delays feedback, never answers or probes."""
    database_pending: int = 0

    def start(self) -> None:
        self.admission = Admission(self.limits.max_concurrent, self.limits.max_queue)
        self.scheduler = BatchScheduler(self.limits.prefill_chunk, self.limits.batch_wait_ms / 1000,
                                        on_step=self.metrics.batch_size.observe)
        admission, scheduler = self.admission, self.scheduler
        self.metrics.watch(lambda: admission.waiting, lambda: admission.active, lambda: scheduler.running)
        self.scheduler.start()

        if self.request_log is not None:
            self.database = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="request-log-db")
            self.request_log.start()

    async def on_database(self, call, *args) -> Any:
        """Run ``call(*args)`` on the request log's threads within ``DATABASE_TIMEOUT_S``; answer 503 when the
        database is that slow or ``DATABASE_PENDING`` calls already wait (the call itself still finishes)."""
        assert self.database is not None
        if self.database_pending >= DATABASE_PENDING:
            raise OpenAIError(503, "The request log is busy; retry in a few seconds.", code="request_log_busy",
                              headers={"Retry-After": "2"})
        self.database_pending += 1
        given_up = threading.Event()

        def run() -> Any:
            if given_up.is_set():  # its request was already answered 503: the client will send it again
                return None
            return call(*args)

        future = asyncio.get_running_loop().run_in_executor(self.database, run)

        def done(_future) -> None:
            self.database_pending -= 1

        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), DATABASE_TIMEOUT_S)
        except TimeoutError:
            given_up.set()
            raise OpenAIError(503, f"The request log did not answer within {DATABASE_TIMEOUT_S:.0f} s; retry "
                              "later (a rating sent again replaces the first).", code="request_log_busy",
                              headers={"Retry-After": "5"}) from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.request_log is not None:
            self.request_log.stop()
        if self.database is not None:
            self.database.shutdown(wait=False, cancel_futures=True)

    @property
    def accepted_names(self) -> set[str]:
        return {self.model_name, f"{self.model_name}@{self.alias}", self.alias}

    def model_for(self, requested: str) -> LoadedModel:
        if requested not in self.accepted_names:
            raise OpenAIError(404, f"The model `{requested[:100]}` does not exist; this endpoint serves "
                              f"`{self.model_name}`.", param="model", code="model_not_found")
        loaded = self.watcher.current
        if loaded is None:
            raise OpenAIError(503, f"No model is loaded yet ({self.watcher.state}): "
                              f"{self.watcher.detail or 'the champion is loading'}.", code="model_not_ready",
                              headers={"Retry-After": "5"})
        return loaded


    def pick(self, request: Request, req) -> tuple[LoadedModel, str]:
        """Return the model that answers this request and its role (``champion`` or ``candidate``)."""
        if req.model == f"{self.model_name}@{CANDIDATE_ALIAS}":
            loaded = self.candidate.current if self.candidate else None
            if loaded is None:
                raise OpenAIError(404, f"No candidate of `{self.model_name}` is being rolled out now.",
                                  param="model", code="model_not_found")
            return loaded, "candidate"
        champion = self.model_for(req.model)
        active = self.candidate.active() if self.candidate else None
        if active is not None:
            state = request.scope.get("state", {})
            identity = req.user or state.get("key_id") or state["request_id"]
            if routes_to_candidate(active[0], identity):
                return active[1], "candidate"
        return champion, "champion"

    def shadow_target(self) -> LoadedModel | None:
        """Return the candidate when a shadow rollout is on and a generation slot is free, else None."""
        active = self.candidate.active() if self.candidate else None
        if active is None or active[0].mode != "shadow":
            return None
        assert self.admission is not None
        if self.admission.active >= self.limits.max_concurrent or self.admission.waiting \
                or self.shadows >= max(1, self.limits.max_concurrent // 2):
            self.metrics.shadows.labels("skipped").inc()
            return None
        return active[1]


def server_of(request: Request) -> Server:
    return request.app.state.server


def _note(request: Request, **values: Any) -> None:
    """Record facts about the request for the access log (never its content)."""
    request.scope.setdefault("state", {}).update(values)


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Readiness: 200 only while a model is loaded and no swap is under way."""
    server = server_of(request)
    watcher = server.watcher
    loaded = watcher.current
    state = watcher.state
    admission = server.admission
    body = {
        "status": state, "ready": state == "ready", "model": server.model_name,
        "version": loaded.record.version if loaded else None,
        "dataset": loaded.record.dataset_tag if loaded else None,
        "window": loaded.window if loaded else None,
        "loading": watcher.loading, "detail": watcher.detail,
        "active": admission.active if admission else 0, "waiting": admission.waiting if admission else 0,
        "rollout": _rollout_info(server),
        "request_log": ({"written": server.request_log.written, "failed": server.request_log.failed,
                         "dropped": server.request_log.dropped} if server.request_log is not None else None),
    }
    return JSONResponse(body, 200 if state == "ready" else 503)


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


def _chat_prompt(loaded: LoadedModel, req: ChatRequest) -> list[int]:
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            part.text or "" for part in m.content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return list(loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _completion_prompts(loaded: LoadedModel, req: CompletionRequest) -> list[list[int]]:
    prompts = req.prompts()
    if not prompts:
        raise OpenAIError(400, "prompt is empty.", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(400, f"At most {MAX_PROMPTS} prompts per request, got {len(prompts)}.", param="prompt")
    vocab = loaded.shape.vocab
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            if any(not 0 <= t < vocab for t in prompt):
                raise OpenAIError(400, f"prompt contains token ids outside the vocabulary (0..{vocab - 1}).",
                                  param="prompt", code="invalid_token_id")
            ids = list(prompt)
        if not ids:
            raise OpenAIError(400, "prompt is empty.", param="prompt")
        out.append(ids)
    return out


def _plan(server: Server, loaded: LoadedModel, prompts: list[list[int]], req, chat: bool) -> tuple[SamplingParams, int]:
    """Check the context window and build the sampling parameters; return them with the request's memory cost."""
    window = loaded.window
    longest = max(len(p) for p in prompts)
    what = "messages" if chat else "prompt"
    requested = req.requested_max_tokens()
    if chat and requested == 0:
        raise OpenAIError(400, "max_tokens must be at least 1 for chat completions.", param="max_tokens")
    if requested is not None and requested > window:
        raise OpenAIError(
            400, f"max_tokens is too large: {requested}. This model's maximum context length is {window} tokens "
            f"and your request has {longest} input tokens ({requested} > {window} - {longest}).",
            param="max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
            code="context_length_exceeded")
    if requested is None:
        if longest >= window:
            raise OpenAIError(
                400, f"This model's maximum context length is {window} tokens. However, your {what} resulted in "
                f"{longest} tokens. Please reduce the length of the {what}.", param=what,
                code="context_length_exceeded")
        max_tokens = min(server.limits.default_max_tokens, window - longest)
    else:
        max_tokens = requested
        if longest + max_tokens > window:
            raise OpenAIError(
                400, f"This model's maximum context length is {window} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the completion). "
                f"Please reduce the length of the {what} or completion.", param=what, code="context_length_exceeded")
    bias = None
    if req.logit_bias:
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        if any(k >= loaded.shape.vocab for k in bias):
            raise OpenAIError(400, f"logit_bias names token ids outside the vocabulary (0..{loaded.shape.vocab - 1}).",
                              param="logit_bias")
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        echo = False
    else:
        logprobs, echo = req.logprobs, req.echo
    if not chat and max_tokens == 0 and not echo:
        raise OpenAIError(400, "max_tokens 0 only makes sense with echo (to score the prompt).", param="max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.sampling_temperature, top_p=req.top_p, seed=req.seed,
        stop=tuple(req.stops),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=bias,
        logprobs=logprobs, echo=echo,
    )
    scoring = echo and logprobs is not None
    cost = loaded.cost(longest + max_tokens, server.limits.prefill_chunk, all_logits=scoring)
    return params, cost


def _parallel(loaded: LoadedModel, prompts: list[list[int]], cost: int) -> int:
    """Return how many of a request's prompts decode side by side: as many as the memory for requests holds."""
    return max(1, min(len(prompts), loaded.capacity_bytes // max(cost, 1)))


async def _admit(request: Request, server: Server, loaded: LoadedModel, cost: int, deadline: float) -> Ticket:
    assert server.admission is not None
    ticket = await server.admission.acquire(cost, loaded.capacity_bytes, deadline)
    _note(request, waited_s=round(time.monotonic() - request.scope["state"]["started"], 3))
    return ticket


def _start(server: Server, loaded: LoadedModel, prompts, params, cancel, deadline, ticket, parallel: int,
           on_delta=None) -> asyncio.Task:
    """Run the prompts in the batch, at most ``parallel`` at a time; release the slot when all are done."""
    assert server.scheduler is not None
    scheduler = server.scheduler
    gate = asyncio.Semaphore(parallel)

    async def one(index: int, prompt: list[int]) -> GenerationResult:
        async with gate:
            delta = (lambda text, lps, i=index: on_delta(i, text, lps)) if on_delta else None
            sequence = Sequence(loaded, prompt, params, cancel, deadline, delta)
            if cancel.is_set():
                sequence.finish("cancelled")
                return sequence.result
            return await asyncio.wrap_future(scheduler.submit(sequence))

    async def work() -> list[GenerationResult]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    task = asyncio.ensure_future(work())
    task.add_done_callback(lambda _f: ticket.release())
    return task


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
    _note(request, response_id=body.response_id)
    server.metrics.feedback.labels(str(body.rating), str(stored["model_version"])).inc()
    return JSONResponse(stored, 201)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, req: ChatRequest):
    server = server_of(request)
    check_supported(req)
    loaded, role = server.pick(request, req)
    if isinstance(loaded, UpstreamModel):
        return await _forward(request, server, loaded, req, chat=True, role=role)
    prompt = await run_in_threadpool(_chat_prompt, loaded, req)
    return await _serve(request, server, loaded, [prompt], req, chat=True, role=role)


@router.post("/v1/completions")
async def completions(request: Request, req: CompletionRequest):
    server = server_of(request)
    check_supported(req)
    loaded, role = server.pick(request, req)
    if isinstance(loaded, UpstreamModel):
        return await _forward(request, server, loaded, req, chat=False, role=role)
    prompts = await run_in_threadpool(_completion_prompts, loaded, req)
    return await _serve(request, server, loaded, prompts, req, chat=False, role=role)


async def _serve(request: Request, server: Server, loaded: LoadedModel, prompts, req, chat: bool,
                 role: str = "champion"):
    params, cost = _plan(server, loaded, prompts, req, chat)
    parallel = _parallel(loaded, prompts, cost)
    deadline = request.scope["state"]["started"] + server.limits.request_timeout_s
    version = loaded.record.version
    rid = ("chatcmpl-" if chat else "cmpl-") + request.scope["state"]["request_id"]
    _note(request, response_id=rid, model_version=version, model_role=role,
          prompt_tokens=sum(len(p) for p in prompts))
    ticket = await _admit(request, server, loaded, cost * parallel, deadline)
    cancel = threading.Event()
    headers = {"X-Nightshift-Model-Version": str(version), "X-Nightshift-Model-Role": role}
    answer = Answer(server.model_name, rid, int(time.time()), f"v{version}", chat)
    queue: asyncio.Queue | None = asyncio.Queue() if req.stream else None
    on_delta = None
    if queue is not None:
        loop = asyncio.get_running_loop()

        def on_delta(index: int, text: str, logprobs: list[TokenLogprob]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", index, text, logprobs))

    try:
        future = _start(server, loaded, prompts, params, cancel, deadline, ticket, parallel, on_delta)
    except BaseException:
        ticket.release()
        raise
    if queue is not None:
        future.add_done_callback(lambda _f: queue.put_nowait(("end", 0, "", [])))
        events = _stream(request, server, loaded, prompts, req, params, future, queue, answer, role)
        return CancellingStream(events, cancel, media_type="text/event-stream", headers=headers)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                cancel.set()
        results = future.result()
    except asyncio.CancelledError:
        cancel.set()
        raise
    except Exception:  # counted against the version in the request log, then answered as a 500
        _log_answer(request, server, loaded, req, answer, prompts,
                    [GenerationResult(token_ids=[], text="", finish_reason="error")], role)
        raise
    finish = [r.finish_reason for r in results]
    _note(request, completion_tokens=sum(len(r.token_ids) for r in results), finish=",".join(finish))
    if "timeout" in finish:
        _log_answer(request, server, loaded, req, answer, prompts, results, role)
        raise OpenAIError(504, f"Generation timed out after {server.limits.request_timeout_s:.0f} s "
                          "(NIGHTSHIFT_SERVE_TIMEOUT_S); ask for fewer tokens or retry later.", code="timeout")
    if "cancelled" in finish:
        raise OpenAIError(499, "The client closed the request.", code="client_closed_request")
    _log_answer(request, server, loaded, req, answer, prompts, results, role)
    _shadow(request, server, req, answer, role)
    return JSONResponse(answer.body(results, prompts, params.logprobs is not None), headers=headers)


def _shadow(request: Request, server: Server, req, answer: Answer, role: str) -> None:
    """In a shadow rollout, let the candidate answer the same request in the background, for the log only."""
    if role != "champion" or server.request_log is None:
        return
    candidate = server.shadow_target()
    if candidate is None:
        return
    if isinstance(candidate, UpstreamModel):
        _shadow_upstream(request, server, req, answer, candidate)
        return
    try:
        prompts = [_chat_prompt(candidate, req)] if answer.chat else _completion_prompts(candidate, req)
        params, cost = _plan(server, candidate, prompts, req, answer.chat)
    except OpenAIError:  # the candidate's window cannot hold this request
        server.metrics.shadows.labels("skipped").inc()
        return
    # A shadow answer is charged like any request, its prompts side by side as memory allows, and is skipped
    # (never queued) when the slot or the memory is not free now.
    assert server.admission is not None
    parallel = _parallel(candidate, prompts, cost)
    ticket = server.admission.try_acquire(cost * parallel, candidate.capacity_bytes)
    if ticket is None:
        server.metrics.shadows.labels("skipped").inc()
        return
    deadline = time.monotonic() + server.limits.request_timeout_s
    shadow_answer = Answer(answer.model, f"{answer.id}-shadow", answer.created, answer.fingerprint, answer.chat)

    async def run(started: float) -> None:
        try:
            work = _start(server, candidate, prompts, params, threading.Event(), deadline, ticket, parallel)
        except BaseException:
            ticket.release()
            raise
        results = await work
        _log_answer(request, server, candidate, req, shadow_answer, prompts, results, "shadow",
                    started=time.monotonic() - started)

    _in_background(server, run)


_background: set[asyncio.Task] = set()


def _in_background(server: Server, work) -> None:
    """Run a shadow generation ``work(started)`` after the answer has gone, counting its outcome."""
    server.shadows += 1

    async def run() -> None:
        try:
            await work(time.monotonic())
            server.metrics.shadows.labels("answered").inc()
        except Exception as exc:
            log.warning("shadow generation failed: %s", type(exc).__name__)
            server.metrics.shadows.labels("failed").inc()
        finally:
            server.shadows -= 1

    task = asyncio.ensure_future(run())
    _background.add(task)
    task.add_done_callback(_background.discard)


def _choice_texts(data: dict[str, Any], chat: bool) -> tuple[list[str], str]:
    """Return the texts of an OpenAI answer's choices and their finish reasons, comma-joined."""
    choices = data.get("choices", [])
    texts = [((c.get("message") or {}).get("content") or "") if chat else (c.get("text") or "") for c in choices]
    return texts, ",".join(str(c.get("finish_reason")) for c in choices)


def _shadow_upstream(request: Request, server: Server, req, answer: Answer, candidate: UpstreamModel) -> None:
    body = req.model_dump(exclude_unset=True)
    body.update(model=candidate.served_name, stream=False)
    body.pop("stream_options", None)
    url = f"{candidate.base_url}{'/chat/completions' if answer.chat else '/completions'}"
    shadow_answer = Answer(answer.model, f"{answer.id}-shadow", answer.created, answer.fingerprint, answer.chat)

    async def run(started: float) -> None:
        r = await server.upstream_client().post(url, json=body, timeout=server.limits.request_timeout_s)
        r.raise_for_status()
        data = r.json()
        texts, finish = _choice_texts(data, answer.chat)
        usage = data.get("usage") or {}
        _record_answer(request, server, candidate.record, req, shadow_answer, texts, finish,
                       usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), "shadow",
                       time.monotonic() - started)

    _in_background(server, run)


def _log_answer(request: Request, server: Server, loaded: LoadedModel, req, answer: Answer, prompts,
                results: list[GenerationResult], role: str = "champion", started: float | None = None) -> None:
    """Queue the answer for the request log, with the version, run and dataset that produced it."""
    _record_answer(request, server, loaded.record, req, answer, [r.text for r in results],
                   ",".join(r.finish_reason for r in results), sum(len(p) for p in prompts),
                   sum(len(r.token_ids) for r in results), role, started)


def _record_answer(request: Request, server: Server, record, req, answer: Answer, texts: list[str], finish: str,
                   prompt_tokens: int, completion_tokens: int, role: str, seconds: float | None = None) -> None:
    if server.request_log is None:
        return
    state = request.scope["state"]
    if seconds is None:
        seconds = time.monotonic() - state["started"]
    if answer.chat:
        content: Any = [m.model_dump(include={"role", "content"}) for m in req.messages]
    else:
        content = req.prompts()
    server.request_log.record(LoggedAnswer(
        response_id=answer.id, key_id=state.get("key_id"), route="chat" if answer.chat else "completions",
        model_name=server.model_name, model_version=record.version, model_role=role, run_id=record.run_id or None,
        dataset_tag=record.dataset_tag or None, request=content, answer=texts, finish=finish,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, seconds=seconds))


@dataclass
class Answer:
    """Builds the OpenAI response objects of one request."""

    model: str
    id: str
    created: int
    fingerprint: str
    chat: bool

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def body(self, results: list[GenerationResult], prompts: list[list[int]], logprobs: bool) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(r.token_ids) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if self.chat:
            r = results[0]
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text, "refusal": None},
                      "logprobs": _chat_logprobs(r.logprobs) if logprobs else None,
                      "finish_reason": r.finish_reason}
            return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage}
        choices = []
        for i, r in enumerate(results):
            text = (r.prompt_text if r.prompt_text else "") + r.text
            choices.append({"index": i, "text": text, "logprobs": _completion_logprobs(r), "finish_reason":
                            r.finish_reason})
        return {**self._envelope("text_completion"), "choices": choices, "usage": usage}

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: list[TokenLogprob] | None,
              first: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": _chat_logprobs(logprobs) if logprobs else None,
                      "finish_reason": finish}
            body = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        else:
            lp = None
            if logprobs:
                lp = {"tokens": [t.token for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
                      "top_logprobs": [{**dict(t.top), t.token: t.logprob} for t in logprobs],
                      "text_offset": [t.offset for t in logprobs]}
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            body = {**self._envelope("text_completion"), "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {**self._envelope(kind), "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}}
        return f"data: {json.dumps(body)}\n\n"


def _chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(t.token, t.logprob), "top_logprobs": [item(tok, lp) for tok, lp in t.top]}
                        for t in logprobs], "refusal": None}


def _completion_logprobs(r: GenerationResult) -> dict[str, Any] | None:
    entries = list(r.prompt_logprobs)
    if not entries and not r.logprobs:
        return None
    shift = len(r.prompt_text)
    generated = [TokenLogprob(t.token_id, t.token, t.logprob, t.top, t.offset + shift) for t in r.logprobs]
    entries += generated
    return {
        "tokens": [t.token for t in entries],
        "token_logprobs": [t.logprob for t in entries],
        # The chosen token is listed among the alternatives too, as vLLM does.
        "top_logprobs": [None if t.logprob is None else {**dict(t.top), t.token: t.logprob} for t in entries],
        "text_offset": [t.offset for t in entries],
    }


class CancellingStream(StreamingResponse):
    """A streamed answer that stops its generation however the response ends: complete, failed or disconnected."""

    def __init__(self, content, cancel: threading.Event, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


async def _stream(request: Request, server: Server, loaded: LoadedModel, prompts, req, params: SamplingParams,
                  future: asyncio.Future, queue: asyncio.Queue, answer: Answer, role: str) -> AsyncIterator[str]:
    include_usage = req.include_usage
    if answer.chat:
        yield answer.chunk(0, None, None, None, first=True)
    elif params.echo:
        for i, prompt in enumerate(prompts):
            yield answer.chunk(i, loaded.tokenizer.decode(prompt, skip_special_tokens=True), None, None)
    while True:
        kind, index, text, logprobs = await queue.get()
        if kind == "end":
            break
        yield answer.chunk(index, text, None, logprobs if params.logprobs is not None else None)
    try:
        results = future.result()
    except Exception as exc:
        log.exception("generation failed for %s", answer.id)
        _log_answer(request, server, loaded, req, answer, prompts,
                    [GenerationResult(token_ids=[], text="", finish_reason="error")], role)
        yield _event_error(f"generation failed: {type(exc).__name__}", None)
        yield "data: [DONE]\n\n"
        _note(request, finish="error")
        return
    completion_tokens = sum(len(r.token_ids) for r in results)
    _note(request, completion_tokens=completion_tokens, finish=",".join(r.finish_reason for r in results))
    for i, r in enumerate(results):
        if r.finish_reason == "timeout":
            yield _event_error(f"Generation timed out after {server.limits.request_timeout_s:.0f} s.", "timeout")
        else:
            yield answer.chunk(i, None, r.finish_reason, None)
    if include_usage:
        yield answer.usage_chunk(sum(len(p) for p in prompts), completion_tokens)
    yield "data: [DONE]\n\n"
    if not any(r.finish_reason == "cancelled" for r in results):
        _log_answer(request, server, loaded, req, answer, prompts, results, role)
        if not any(r.finish_reason == "timeout" for r in results):
            _shadow(request, server, req, answer, role)


async def _forward(request: Request, server: Server, target: UpstreamModel, req, chat: bool, role: str):
    """Send an admitted request to the engine serving ``target``; relay its answer under nightshift's ids."""
    import httpx

    state = request.scope["state"]
    deadline = state["started"] + server.limits.request_timeout_s
    version = target.record.version
    rid = ("chatcmpl-" if chat else "cmpl-") + state["request_id"]
    _note(request, response_id=rid, model_version=version, model_role=role)
    assert server.admission is not None
    ticket = await server.admission.acquire(0, 1 << 62, deadline)  # the engine manages its own memory
    _note(request, waited_s=round(time.monotonic() - state["started"], 3))
    body = req.model_dump(exclude_unset=True)
    body["model"] = target.served_name
    url = f"{target.base_url}{'/chat/completions' if chat else '/completions'}"
    headers = {"X-Nightshift-Model-Version": str(version), "X-Nightshift-Model-Role": role}
    answer = Answer(server.model_name, rid, int(time.time()), f"v{version}", chat)
    client = server.upstream_client()
    timeout = httpx.Timeout(max(1.0, deadline - time.monotonic()), connect=5.0)
    try:
        # An engine answering a plain request sends nothing until the whole answer is ready: the client is
        # watched from the start, and one that leaves closes the engine's request, which is how vLLM learns to
        # abort it and free its slot (it generated the whole answer for nobody otherwise).
        upstream = await _unless_client_leaves(
            request, client.send(client.build_request("POST", url, json=body, timeout=timeout), stream=True))
    except _ClientGone:
        ticket.release()
        return _abandoned(request, server, target, req, answer, role)
    except httpx.HTTPError as exc:
        ticket.release()
        raise OpenAIError(502, f"The model engine for v{version} is unreachable ({type(exc).__name__}); retry "
                          "later.", code="engine_unavailable", headers={"Retry-After": "5"}) from None
    if upstream.status_code != 200:
        try:
            error = json.loads(await upstream.aread()).get("error") or {}
        except ValueError:
            error = {}
        finally:
            await upstream.aclose()
            ticket.release()
        raise OpenAIError(upstream.status_code, str(error.get("message") or "The model engine refused the request.")
                          [:2000], param=error.get("param"), code=error.get("code"), headers=headers)
    if not req.stream:
        try:
            data = json.loads(await _unless_client_leaves(request, upstream.aread()))
        except _ClientGone:
            return _abandoned(request, server, target, req, answer, role)
        finally:
            await upstream.aclose()
            ticket.release()
        data.update(id=rid, model=server.model_name, system_fingerprint=f"v{version}")
        texts, finish = _choice_texts(data, chat)
        usage = data.get("usage") or {}
        _note(request, prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
              finish=finish)
        _record_answer(request, server, target.record, req, answer, texts, finish, usage.get("prompt_tokens", 0),
                       usage.get("completion_tokens", 0), role)
        _shadow(request, server, req, answer, role)
        return JSONResponse(data, headers=headers)

    async def relay() -> AsyncIterator[str]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        usage: dict[str, int] = {}
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                chunk.update(id=rid, model=server.model_name, system_fingerprint=f"v{version}")
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    texts.setdefault(c.get("index", 0), []).append(piece or "")
                    if c.get("finish_reason"):
                        finish[c.get("index", 0)] = c["finish_reason"]
                usage = chunk.get("usage") or usage
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await upstream.aclose()
            ticket.release()
        ordered = [("".join(texts[i])) for i in sorted(texts)]
        reasons = ",".join(finish.get(i, "cancelled") for i in sorted(texts))
        _note(request, completion_tokens=usage.get("completion_tokens"), prompt_tokens=usage.get("prompt_tokens"),
              finish=reasons)
        _record_answer(request, server, target.record, req, answer, ordered, reasons, usage.get("prompt_tokens", 0),
                       usage.get("completion_tokens", 0), role)
        if "cancelled" not in reasons:
            _shadow(request, server, req, answer, role)

    return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)


def _abandoned(request: Request, server: Server, target: UpstreamModel, req, answer: Answer, role: str) -> Response:
    """Log an answer whose client left (``cancelled``) and return the response nobody will read."""
    _note(request, finish="cancelled")
    _record_answer(request, server, target.record, req, answer, [""], "cancelled", 0, 0, role)
    return Response(status_code=499)


class _ClientGone(Exception):
    """The client closed its connection while its answer was being made."""


async def _unless_client_leaves(request: Request, awaitable):
    """Return what ``awaitable`` returns; cancel it and raise _ClientGone when the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                raise _ClientGone
    except BaseException:
        work.cancel()
        raise


def _event_error(message: str, code: str | None) -> str:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n"
