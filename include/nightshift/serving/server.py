"""What the route handlers share: the served models, limits, admission, the batch scheduler, the request log.

``Server.pick`` turns a request into a target (``local.LocalTarget``: this process's continuous batch;
``relay.UpstreamTarget``: an OpenAI-compatible engine such as vLLM) and the role it answers in; both targets
answer through the same interface (``answer``, ``shadow``) and end in ``afterwork.answered``.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from nightshift.records import ModelVersionRecord
from nightshift.registry.rollout_state import CANDIDATE_ALIAS
from nightshift.serving.batching import BatchScheduler
from nightshift.serving.canary import CandidateWatcher, routes_to_candidate
from nightshift.serving.limits import Admission
from nightshift.serving.loading import LoadedModel
from nightshift.serving.local import LocalTarget
from nightshift.serving.metrics import ServingMetrics
from nightshift.serving.prompting import AppliedPrompt, PromptWatcher
from nightshift.serving.protocol import OpenAIError
from nightshift.serving.relay import UpstreamTarget
from nightshift.serving.requestlog import RequestLog
from nightshift.serving.retrieval import ServingRetrieval
from nightshift.serving.upstream import UpstreamModel
from nightshift.serving.watching import ChampionWatcher
from nightshift.settings import ServingLimits

DATABASE_THREADS = 2
DATABASE_PENDING = 16
DATABASE_TIMEOUT_S = 5.0


class Target(Protocol):
    """What answers a request: a model loaded here, or an engine serving one."""

    record: ModelVersionRecord

    async def answer(self, request: Request, req, chat: bool, role: str) -> Response:
        """Admit, run and answer the request (a JSON body or a stream), then hand it to ``afterwork.answered``."""

    def shadow(self, request: Request, req, answer):
        """Return an awaitable factory answering ``req`` again for the log only (``afterwork.Ended``), or None
        when it is skipped (the request does not fit, or no slot is free now)."""


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
    admission: Admission | None = None
    scheduler: BatchScheduler | None = None
    database: ThreadPoolExecutor | None = None
    """The request log's own threads: a slow or locked database delays feedback, never answers or probes."""
    database_pending: int = 0
    prompts: PromptWatcher | None = None
    """The prompt template applied to chat requests (None: the chat template alone)."""
    retrieval: ServingRetrieval | None = None
    """/v1/embeddings and retrieval-augmented answers (serving/retrieval.py); None: both answer 404."""
    _client: Any = None

    def upstream_client(self):
        """The HTTP client of the engine path (one connection pool for the server's life)."""
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.limits.max_concurrent * 2 + 4)
            self._client = httpx.AsyncClient(limits=limits)
        return self._client

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.scheduler = scheduler = BatchScheduler(
            self.limits.prefill_chunk, self.limits.batch_wait_ms / 1000, on_step=self.metrics.batch_size.observe,
            free=lambda loaded: admission.free(loaded.capacity_bytes),
            on_release=lambda: loop.call_soon_threadsafe(admission.wake))
        self.admission = admission = Admission(self.limits.max_concurrent, self.limits.max_queue,
                                               reserved=lambda: scheduler.padding_bytes)
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

    def model_for(self, requested: str) -> LoadedModel | UpstreamModel:
        if requested not in self.accepted_names:
            raise OpenAIError(404, f"The model `{requested[:100]}` does not exist; this endpoint serves "
                              f"`{self.model_name}`.", param="model", code="model_not_found")
        loaded = self.watcher.current
        if loaded is None:
            raise OpenAIError(503, f"No model is loaded yet ({self.watcher.state}): "
                              f"{self.watcher.detail or 'the champion is loading'}.", code="model_not_ready",
                              headers={"Retry-After": "5"})
        return loaded


    def target(self, model: LoadedModel | UpstreamModel) -> Target:
        """Return what answers with ``model``: this process's batch, or the engine that serves it."""
        if isinstance(model, UpstreamModel):
            return UpstreamTarget(self, model)
        return LocalTarget(self, model)

    def pick(self, request: Request, req) -> tuple[Target, str]:
        """Return the target that answers this request and its role (``champion`` or ``candidate``)."""
        if req.model == f"{self.model_name}@{CANDIDATE_ALIAS}":
            loaded = self.candidate.current if self.candidate else None
            if loaded is None:
                raise OpenAIError(404, f"No candidate of `{self.model_name}` is being rolled out now.",
                                  param="model", code="model_not_found")
            return self.target(loaded), "candidate"
        champion = self.model_for(req.model)
        active = self.candidate.active() if self.candidate else None
        if active is not None:
            state = request.scope.get("state", {})
            identity = req.user or state.get("key_id") or state["request_id"]
            if routes_to_candidate(active[0], identity):
                return self.target(active[1]), "candidate"
        return self.target(champion), "champion"

    def prompt_for(self, request: Request, req) -> AppliedPrompt | None:
        """Return the prompt version a chat request is answered under (noted on the request), or None; a 400 when
        its ``prompt_variables`` name a variable the prompt does not have or a value that is too long."""
        from nightshift.prompts.template import PromptError
        from nightshift.serving.context import note

        if self.prompts is None or not hasattr(req, "messages"):
            return None
        if not self.prompts.ready:
            raise OpenAIError(503, f"The prompt registry has not been read yet ({self.prompts.detail or 'starting'}):"
                              " the endpoint does not answer without the operator's prompt.", code="prompt_not_ready",
                              headers={"Retry-After": "5"})
        state = request.scope.get("state", {})
        applied = self.prompts.pick(req.user or state.get("key_id") or state["request_id"])
        if applied is None:
            return None
        try:
            values = applied.version.template.values(req.prompt_variables)
        except PromptError as exc:
            raise OpenAIError(400, str(exc), param="prompt_variables", code="invalid_value") from None
        loaded = self.watcher.current
        special = getattr(getattr(loaded, "tokenizer", None), "all_special_tokens", None) or []
        for key in req.prompt_variables or {}:
            if any(token and token in values[key] for token in special):
                raise OpenAIError(400, f"prompt_variables.{key} holds one of the model's special tokens: a value is "
                                  "text inside the operator's prompt, not a turn", param="prompt_variables",
                                  code="invalid_value")
        note(request, prompt=applied, prompt_version=applied.header)
        return applied

    def retrieval_asked(self, req, chat: bool) -> bool:
        """Return whether the request asks for retrieval (the model name's ``+rag`` suffix, or a ``rag`` field); the
        suffix is taken off the name, so the request is then routed as any other."""
        from nightshift.serving.retrieval import RAG_SUFFIX

        extra = req.model_extra or {}
        raw = extra.get("rag")
        if raw is not None and not isinstance(raw, bool | dict):
            raise OpenAIError(400, "rag must be true, false or an object like {\"top_k\": 4}.", param="rag",
                              code="invalid_value")
        if raw is False or (raw is None and "rag" in extra):
            extra.pop("rag")
        asked = req.model.endswith(RAG_SUFFIX) or raw is True or isinstance(raw, dict)
        if not asked:
            return False
        if req.model.endswith(RAG_SUFFIX):
            req.model = req.model[: -len(RAG_SUFFIX)]
        if not chat:
            raise OpenAIError(400, "Retrieval-augmented answers are for /v1/chat/completions.", param="model",
                              code="invalid_value")
        if self.retrieval is None:
            raise OpenAIError(404, "Retrieval is off on this endpoint.", param="model", code="model_not_found")
        return True

    def shadow_target(self) -> Target | None:
        """Return the candidate's target when a shadow rollout is on and a generation slot is free, else None."""
        active = self.candidate.active() if self.candidate else None
        if active is None or active[0].mode != "shadow":
            return None
        assert self.admission is not None
        if self.admission.active >= self.limits.max_concurrent or self.admission.waiting \
                or self.shadows >= max(1, self.limits.max_concurrent // 2):
            self.metrics.shadows.labels("skipped").inc()
            return None
        return self.target(active[1])

