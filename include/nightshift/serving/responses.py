"""Response shaping: OpenAI's answer objects, streamed chunks (server-sent events) and log-probabilities."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from nightshift.serving.decoding import GenerationResult, TokenLogprob

DONE = "data: [DONE]\n\n"


@dataclass
class Answer:
    """Builds the OpenAI response objects of one request."""

    model: str
    id: str
    created: int
    fingerprint: str
    chat: bool
    citations: list[dict[str, Any]] | None = None
    """A retrieval-augmented answer's citations: in the answer, or in a stream's first chunk."""

    def _envelope(self, kind: str, citations: bool = False) -> dict[str, Any]:
        envelope = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                    "system_fingerprint": self.fingerprint}
        if citations and self.citations is not None:
            envelope["citations"] = self.citations
        return envelope

    def body(self, results: list[GenerationResult], prompts: list[list[int]], logprobs: bool) -> dict[str, Any]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(r.token_ids) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if self.chat:
            r = results[0]
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text, "refusal": None},
                      "logprobs": chat_logprobs(r.logprobs) if logprobs else None,
                      "finish_reason": r.finish_reason}
            return {**self._envelope("chat.completion", citations=True), "choices": [choice], "usage": usage}
        choices = []
        for i, r in enumerate(results):
            text = (r.prompt_text if r.prompt_text else "") + r.text
            choices.append({"index": i, "text": text, "logprobs": completion_logprobs(r), "finish_reason":
                            r.finish_reason})
        return {**self._envelope("text_completion"), "choices": choices, "usage": usage}

    def chunk(self, index: int, text: str | None, finish: str | None, logprobs: list[TokenLogprob] | None,
              first: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs) if logprobs else None,
                      "finish_reason": finish}
            body = {**self._envelope("chat.completion.chunk", citations=first), "choices": [choice]}
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


def citation_headers(citations: list[dict[str, Any]] | None) -> dict[str, str]:
    """``X-Nightshift-Citations``: the cited documents' ids, URL-quoted, comma-separated (retrieval answers only)."""
    if citations is None:
        return {}
    from urllib.parse import quote

    used = [c["document"] for c in citations if c.get("number") is not None]
    return {"X-Nightshift-Citations": ",".join(quote(d, safe="") for d in dict.fromkeys(used))[:4000]}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(t.token, t.logprob), "top_logprobs": [item(tok, lp) for tok, lp in t.top]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(r: GenerationResult) -> dict[str, Any] | None:
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


def event_error(message: str, code: str | None) -> str:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n"


def choice_texts(data: dict[str, Any], chat: bool) -> tuple[list[str], str]:
    """Return the texts of an OpenAI answer's choices and their finish reasons, comma-joined."""
    choices = data.get("choices", [])
    texts = [((c.get("message") or {}).get("content") or "") if chat else (c.get("text") or "") for c in choices]
    return texts, ",".join(str(c.get("finish_reason")) for c in choices)
