"""The local target: a request answered by a model loaded in this process.

Every limit is checked before the model runs: the token ids and the context window (``plan``), then a
generation slot and the memory (``limits.Admission``). Admitted prompts join the continuous batch
(``batching.BatchScheduler``); a client that disconnects or a request whose deadline passes stops its
sequences within one token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from nightshift.serving.afterwork import Ended, answered
from nightshift.serving.context import note
from nightshift.serving.decoding import GenerationResult, SamplingParams, Sequence, TokenLogprob
from nightshift.serving.limits import Ticket
from nightshift.serving.loading import LoadedModel
from nightshift.serving.prompting import AppliedPrompt, prompt_headers
from nightshift.serving.protocol import MAX_PROMPTS, ChatRequest, CompletionRequest, OpenAIError
from nightshift.serving.responses import DONE, Answer, CancellingStream, citation_headers, event_error

if TYPE_CHECKING:
    from nightshift.serving.server import Server

log = logging.getLogger(__name__)


def _ended(prompts: list[list[int]], results: list[GenerationResult]) -> Ended:
    return Ended([r.text for r in results], [r.finish_reason for r in results], sum(len(p) for p in prompts),
                 sum(len(r.token_ids) for r in results))


def _failed(prompts: list[list[int]]) -> Ended:
    return Ended([""], ["error"], sum(len(p) for p in prompts), 0)


class LocalTarget:
    """Answers with ``loaded``: prompts, plan, admission, continuous batching, streaming."""

    def __init__(self, server: Server, loaded: LoadedModel) -> None:
        self.server = server
        self.loaded = loaded
        self.record = loaded.record

    # -- prompts and plan -----------------------------------------------------------------------------------

    def prompts(self, req, chat: bool, applied: AppliedPrompt | None = None) -> list[list[int]]:
        """Return the token ids of each prompt the request asks to continue (a chat under ``applied``'s template)."""
        return [self._chat_prompt(req, applied)] if chat else self._completion_prompts(req)

    def _chat_prompt(self, req: ChatRequest, applied: AppliedPrompt | None = None) -> list[int]:
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.text or "" for part in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        if applied is not None:
            messages = applied.version.template.apply(messages, req.prompt_variables)
        return list(self.loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        if not prompts:
            raise OpenAIError(400, "prompt is empty.", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise OpenAIError(400, f"At most {MAX_PROMPTS} prompts per request, got {len(prompts)}.", param="prompt")
        vocab = self.loaded.shape.vocab
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                if any(not 0 <= t < vocab for t in prompt):
                    raise OpenAIError(400, f"prompt contains token ids outside the vocabulary (0..{vocab - 1}).",
                                      param="prompt", code="invalid_token_id")
                ids = list(prompt)
            if not ids:
                raise OpenAIError(400, "prompt is empty.", param="prompt")
            out.append(ids)
        return out

    def plan(self, prompts: list[list[int]], req, chat: bool) -> tuple[SamplingParams, int]:
        """Check the context window and build the sampling parameters; return them with the memory one prompt
        is charged (its prompt and max_tokens)."""
        loaded = self.loaded
        window = loaded.window
        longest = max(len(p) for p in prompts)
        what = "messages" if chat else "prompt"
        requested = req.requested_max_tokens()
        if chat and requested == 0:
            raise OpenAIError(400, "max_tokens must be at least 1 for chat completions.", param="max_tokens")
        if requested is not None and requested > window:
            raise OpenAIError(
                400, f"max_tokens is too large: {requested}. This model's maximum context length is {window} "
                f"tokens and your request has {longest} input tokens ({requested} > {window} - {longest}).",
                param="max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
                code="context_length_exceeded")
        if requested is None:
            if longest >= window:
                raise OpenAIError(
                    400, f"This model's maximum context length is {window} tokens. However, your {what} resulted "
                    f"in {longest} tokens. Please reduce the length of the {what}.", param=what,
                    code="context_length_exceeded")
            max_tokens = min(self.server.limits.default_max_tokens, window - longest)
        else:
            max_tokens = requested
            if longest + max_tokens > window:
                raise OpenAIError(
                    400, f"This model's maximum context length is {window} tokens. However, you requested "
                    f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the completion). "
                    f"Please reduce the length of the {what} or completion.", param=what,
                    code="context_length_exceeded")
        bias = None
        if req.logit_bias:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            if any(k >= loaded.shape.vocab for k in bias):
                raise OpenAIError(400, "logit_bias names token ids outside the vocabulary "
                                  f"(0..{loaded.shape.vocab - 1}).", param="logit_bias")
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            echo = False
        else:
            logprobs, echo = req.logprobs, req.echo
        if not chat and max_tokens == 0 and not echo:
            raise OpenAIError(400, "max_tokens 0 only makes sense with echo (to score the prompt).",
                              param="max_tokens")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=req.sampling_temperature, top_p=req.top_p, seed=req.seed,
            stop=tuple(req.stops), presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=bias, logprobs=logprobs, echo=echo,
        )
        scoring = echo and logprobs is not None
        cost = loaded.cost(longest + max_tokens, self.server.limits.prefill_chunk, all_logits=scoring)
        return params, cost

    def parallel(self, prompts: list[list[int]], cost: int) -> int:
        """Return how many of a request's prompts decode side by side: as many as the memory for requests holds."""
        return max(1, min(len(prompts), self.loaded.capacity_bytes // max(cost, 1)))

    # -- running --------------------------------------------------------------------------------------------

    def start(self, prompts, params, cancel, deadline, ticket: Ticket, parallel: int, on_delta=None) -> asyncio.Task:
        """Run the prompts in the batch, at most ``parallel`` at a time; release the slot when all are done."""
        assert self.server.scheduler is not None
        scheduler, loaded = self.server.scheduler, self.loaded
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

        try:
            task = asyncio.ensure_future(work())
        except BaseException:
            ticket.release()
            raise
        task.add_done_callback(lambda _f: ticket.release())
        return task

    async def answer(self, request: Request, req, chat: bool, role: str) -> Response:
        server = self.server
        applied = request.scope["state"].get("prompt")
        prompts = await run_in_threadpool(self.prompts, req, chat, applied)
        params, cost = self.plan(prompts, req, chat)
        parallel = self.parallel(prompts, cost)
        state = request.scope["state"]
        deadline = state["started"] + server.limits.request_timeout_s
        version = self.record.version
        rid = ("chatcmpl-" if chat else "cmpl-") + state["request_id"]
        note(request, response_id=rid, model_version=version, model_role=role,
             prompt_tokens=sum(len(p) for p in prompts))
        assert server.admission is not None
        ticket = await server.admission.acquire(cost * parallel, self.loaded.capacity_bytes, deadline)
        note(request, waited_s=round(time.monotonic() - state["started"], 3))
        cancel = threading.Event()
        headers = {"X-Nightshift-Model-Version": str(version), "X-Nightshift-Model-Role": role,
                   **prompt_headers(applied), **citation_headers(state.get("citations"))}
        answer = Answer(server.model_name, rid, int(time.time()), f"v{version}", chat, state.get("citations"))
        if req.stream:
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def on_delta(index: int, text: str, logprobs: list[TokenLogprob]) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, ("delta", index, text, logprobs))

            future = self.start(prompts, params, cancel, deadline, ticket, parallel, on_delta)
            future.add_done_callback(lambda _f: queue.put_nowait(("end", 0, "", [])))
            events = self._stream(request, prompts, req, params, future, queue, answer, role)
            return CancellingStream(events, cancel, media_type="text/event-stream", headers=headers)
        future = self.start(prompts, params, cancel, deadline, ticket, parallel)
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
            answered(request, server, self.record, req, answer, _failed(prompts), role)
            raise
        answered(request, server, self.record, req, answer, _ended(prompts, results), role)
        finish = [r.finish_reason for r in results]
        if "timeout" in finish:
            raise OpenAIError(504, f"Generation timed out after {server.limits.request_timeout_s:.0f} s "
                              "(NIGHTSHIFT_SERVE_TIMEOUT_S); ask for fewer tokens or retry later.", code="timeout")
        if "cancelled" in finish:
            raise OpenAIError(499, "The client closed the request.", code="client_closed_request")
        return JSONResponse(answer.body(results, prompts, params.logprobs is not None), headers=headers)

    async def _stream(self, request: Request, prompts, req, params: SamplingParams, future: asyncio.Future,
                      queue: asyncio.Queue, answer: Answer, role: str) -> AsyncIterator[str]:
        server = self.server
        logged = False
        try:
            if answer.chat:
                yield answer.chunk(0, None, None, None, first=True)
            elif params.echo:
                for i, prompt in enumerate(prompts):
                    yield answer.chunk(i, self.loaded.tokenizer.decode(prompt, skip_special_tokens=False), None, None)
            while True:
                kind, index, text, logprobs = await queue.get()
                if kind == "end":
                    break
                yield answer.chunk(index, text, None, logprobs if params.logprobs is not None else None)
            try:
                results = future.result()
            except Exception as exc:
                log.exception("generation failed for %s", answer.id)
                logged = True
                answered(request, server, self.record, req, answer, _failed(prompts), role)
                yield event_error(f"generation failed: {type(exc).__name__}", None)
                yield DONE
                return
            ended = _ended(prompts, results)
            for i, r in enumerate(results):
                if r.finish_reason == "timeout":
                    yield event_error(f"Generation timed out after {server.limits.request_timeout_s:.0f} s.",
                                      "timeout")
                else:
                    yield answer.chunk(i, None, r.finish_reason, None)
            if req.include_usage:
                yield answer.usage_chunk(ended.prompt_tokens, ended.completion_tokens)
            yield DONE
            logged = True
            answered(request, server, self.record, req, answer, ended, role)
        finally:
            if not logged:  # the client left mid-stream: logged once its sequences have stopped (within a token)
                future.add_done_callback(lambda f: self._left(request, req, answer, role, prompts, f))

    def _left(self, request: Request, req, answer: Answer, role: str, prompts, future: asyncio.Future) -> None:
        try:
            ended = _ended(prompts, future.result())
        except BaseException:  # noqa: BLE001 - cancelled or failed: logged as such either way
            ended = _failed(prompts)
        answered(request, self.server, self.record, req, answer, ended, role)

    # -- shadow ---------------------------------------------------------------------------------------------

    def shadow(self, request: Request, req, answer: Answer):
        """Charge the candidate's answer like any request, its prompts side by side as memory allows; None when
        the request does not fit its window or the slot or the memory is not free now."""
        server = self.server
        try:
            prompts = self.prompts(req, answer.chat, request.scope["state"].get("prompt"))
            params, cost = self.plan(prompts, req, answer.chat)
        except OpenAIError:  # the candidate's window cannot hold this request
            return None
        assert server.admission is not None
        parallel = self.parallel(prompts, cost)
        ticket = server.admission.try_acquire(cost * parallel, self.loaded.capacity_bytes)
        if ticket is None:
            return None
        deadline = time.monotonic() + server.limits.request_timeout_s

        async def work() -> Ended:
            results = await self.start(prompts, params, threading.Event(), deadline, ticket, parallel)
            return _ended(prompts, results)

        return work
