"""The upstream target: a request answered by an OpenAI-compatible engine (vLLM) that serves the version.

Keys, limits, rollouts, ids, the request log and metrics stay nightshift's; the engine generates. A client
that leaves closes the engine's request, which is how vLLM learns to abort it and free its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nightshift.serving.afterwork import Ended, answered
from nightshift.serving.context import note
from nightshift.serving.prompting import AppliedPrompt, prompt_headers
from nightshift.serving.protocol import OpenAIError
from nightshift.serving.responses import DONE, Answer, choice_texts, citation_headers, event_error
from nightshift.serving.upstream import UpstreamModel

if TYPE_CHECKING:
    from nightshift.serving.server import Server


class ClientGone(Exception):
    """The client closed its connection while its answer was being made."""


async def unless_client_leaves(request: Request, awaitable):
    """Return what ``awaitable`` returns; cancel it and raise ClientGone when the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                raise ClientGone
    except BaseException:
        work.cancel()
        raise


def _ended(data, chat: bool) -> Ended:
    """How an engine's answer ended; ValueError when it is not an OpenAI answer."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) \
            or not all(isinstance(c, dict) for c in data["choices"]):
        raise ValueError("not an OpenAI answer")
    texts, finish = choice_texts(data, chat)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    try:
        return Ended([str(t) for t in texts], finish.split(","), int(usage.get("prompt_tokens") or 0),
                     int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError) as exc:
        raise ValueError("not an OpenAI answer") from exc


class UpstreamTarget:
    """Answers through the engine serving ``model``."""

    def __init__(self, server: Server, model: UpstreamModel) -> None:
        self.server = server
        self.model = model
        self.record = model.record

    def _url(self, chat: bool) -> str:
        return f"{self.model.base_url}{'/chat/completions' if chat else '/completions'}"

    async def answer(self, request: Request, req, chat: bool, role: str) -> Response:
        """Send an admitted request to the engine; relay its answer under nightshift's ids."""
        import httpx

        server = self.server
        state = request.scope["state"]
        deadline = state["started"] + server.limits.request_timeout_s
        version = self.record.version
        rid = ("chatcmpl-" if chat else "cmpl-") + state["request_id"]
        note(request, response_id=rid, model_version=version, model_role=role)
        assert server.admission is not None
        ticket = await server.admission.acquire(0, 1 << 62, deadline)  # the engine manages its own memory
        note(request, waited_s=round(time.monotonic() - state["started"], 3))
        applied = state.get("prompt")
        body = self._body(req, stream=bool(req.stream), applied=applied)
        headers = {"X-Nightshift-Model-Version": str(version), "X-Nightshift-Model-Role": role,
                   **prompt_headers(applied), **citation_headers(request.scope["state"].get("citations"))}
        answer = Answer(server.model_name, rid, int(time.time()), f"v{version}", chat)
        client = server.upstream_client()
        timeout = httpx.Timeout(max(1.0, deadline - time.monotonic()), connect=5.0)
        try:
            # An engine answering a plain request sends nothing until the whole answer is ready: the client is
            # watched from the start, and one that leaves closes the engine's request.
            upstream = await unless_client_leaves(
                request, client.send(client.build_request("POST", self._url(chat), json=body, timeout=timeout),
                                     stream=True))
        except ClientGone:
            ticket.release()
            return self._abandoned(request, req, answer, role)
        except httpx.HTTPError as exc:
            ticket.release()
            self._failed(request, req, answer, role)
            raise OpenAIError(502, f"The model engine for v{version} is unreachable ({type(exc).__name__}); "
                              "retry later.", code="engine_unavailable", headers={"Retry-After": "5"}) from None
        if upstream.status_code != 200:
            try:
                error = json.loads(await upstream.aread()).get("error") or {}
            except (ValueError, AttributeError, httpx.HTTPError):
                error = {}
            finally:
                await upstream.aclose()
                ticket.release()
            if upstream.status_code >= 500:  # the engine failed; a 4xx is the request's fault, not an answer
                self._failed(request, req, answer, role)
            error = error if isinstance(error, dict) else {}
            raise OpenAIError(upstream.status_code, str(error.get("message") or "The model engine refused the "
                              "request.")[:2000], param=error.get("param"), code=error.get("code"), headers=headers)
        if not req.stream:
            try:
                data = json.loads(await unless_client_leaves(request, upstream.aread()))
                ended = _ended(data, chat)
            except ClientGone:
                return self._abandoned(request, req, answer, role)
            except (ValueError, httpx.HTTPError) as exc:
                self._failed(request, req, answer, role)
                raise OpenAIError(502, f"The model engine for v{version} sent an answer that could not be read "
                                  f"({type(exc).__name__}); retry later.", code="engine_unavailable",
                                  headers={"Retry-After": "5"}) from None
            finally:
                await upstream.aclose()
                ticket.release()
            data.update(id=rid, model=server.model_name, system_fingerprint=f"v{version}")
            if (citations := request.scope["state"].get("citations")) is not None:
                data["citations"] = citations
            answered(request, server, self.record, req, answer, ended, role)
            return JSONResponse(data, headers=headers)
        return StreamingResponse(self._relay(request, req, answer, upstream, ticket, role),
                                 media_type="text/event-stream", headers=headers)

    async def _relay(self, request: Request, req, answer: Answer, upstream, ticket, role: str) -> AsyncIterator[str]:
        import httpx

        chat, server = answer.chat, self.server
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        usage: dict[str, int] = {}
        unfinished = "cancelled"  # what a choice without a finish reason ends as: the client left, or the engine failed
        try:
            done = False
            try:
                async for line in upstream.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload.strip() == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:  # the engine failed mid-answer and said so
                        unfinished = "error"
                        yield event_error("The model engine failed while answering; retry later.", "engine_error")
                        continue
                    chunk.update(id=answer.id, model=server.model_name, system_fingerprint=answer.fingerprint)
                    choices = chunk.get("choices") if isinstance(chunk.get("choices"), list) else []
                    for c in choices:
                        if not isinstance(c, dict):
                            continue
                        index = c.get("index", 0) if isinstance(c.get("index", 0), int) else 0
                        piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        texts.setdefault(index, []).append(piece if isinstance(piece, str) else "")
                        if c.get("finish_reason"):
                            finish[index] = str(c["finish_reason"])[:32]  # an engine's word, bounded (the log keeps 64)
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    yield f"data: {json.dumps(chunk)}\n\n"
            except httpx.HTTPError:
                done = False
            if not done:  # the engine's stream broke off
                unfinished = "error"
                yield event_error("The model engine stopped answering mid-way; retry later.", "engine_unavailable")
            yield DONE
        finally:
            await upstream.aclose()
            ticket.release()
            indexes = sorted(texts) or [0]
            try:
                tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
            except (TypeError, ValueError):
                tokens = (0, 0)
            ended = Ended(["".join(texts.get(i, [])) for i in indexes], [finish.get(i, unfinished) for i in indexes],
                          *tokens)
            answered(request, server, self.record, req, answer, ended, role)

    def _body(self, req, stream: bool, applied: AppliedPrompt | None = None) -> dict:
        """The request as the engine gets it: its own model name, the prompt template's messages before the
        caller's, and the stop strings as nightshift reads them (an empty one is ignored here; vLLM would refuse
        it)."""
        body = req.model_dump(exclude_unset=True)
        body.pop("prompt_variables", None)  # nightshift's own field: the engine would refuse it
        if applied is not None and "messages" in body:
            body["messages"] = applied.version.template.apply(body["messages"], req.prompt_variables)
        body.update(model=self.model.served_name, stream=stream)
        if "stop" in body:
            body.pop("stop")
            if req.stops:
                body["stop"] = list(req.stops)
        if not stream:
            body.pop("stream_options", None)
        return body

    def _failed(self, request: Request, req, answer: Answer, role: str) -> None:
        answered(request, self.server, self.record, req, answer, Ended([""], ["error"], 0, 0), role)

    def _abandoned(self, request: Request, req, answer: Answer, role: str) -> Response:
        """Log an answer whose client left (``cancelled``) and return the response nobody will read."""
        answered(request, self.server, self.record, req, answer, Ended([""], ["cancelled"], 0, 0), role)
        return Response(status_code=499)

    def shadow(self, request: Request, req, answer: Answer):
        """The candidate engine answers too, holding a generation slot like any request (the engine manages its
        own memory); None when no slot is free now."""
        server = self.server
        assert server.admission is not None
        ticket = server.admission.try_acquire(0, 1 << 62)
        if ticket is None:
            return None
        body, url = self._body(req, stream=False, applied=request.scope["state"].get("prompt")), self._url(answer.chat)

        async def work() -> Ended:
            try:
                r = await server.upstream_client().post(url, json=body, timeout=server.limits.request_timeout_s)
                r.raise_for_status()
                return _ended(r.json(), answer.chat)
            finally:
                ticket.release()

        return work
