"""After-work: what happens once an answer has ended, on either path, in one place.

Every answer that ends (complete, failed, timed out or abandoned by its client) is noted for the access log
and the metrics and queued for the request log with its finish reasons; a complete champion answer in a
shadow rollout is then answered again by the candidate, in the background, for the log only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from nightshift.serving.context import note
from nightshift.serving.requestlog import LoggedAnswer
from nightshift.serving.responses import Answer

if TYPE_CHECKING:
    from nightshift.serving.server import Server

log = logging.getLogger(__name__)

UNFINISHED = frozenset({"cancelled", "timeout", "error"})


@dataclass(frozen=True)
class Ended:
    """How an answer ended: the text of each choice, its finish reason, and the tokens read and written."""

    texts: list[str]
    finish: list[str]
    prompt_tokens: int
    completion_tokens: int

    @property
    def complete(self) -> bool:
        return not UNFINISHED.intersection(self.finish)


def answered(request: Request, server: Server, record, req, answer: Answer, ended: Ended, role: str) -> None:
    """Note the answer for the access log and metrics, queue it for the request log, and shadow it."""
    note(request, prompt_tokens=ended.prompt_tokens, completion_tokens=ended.completion_tokens,
         finish=",".join(ended.finish))
    log_answer(request, server, record, req, answer, ended, role)
    if role == "champion" and ended.complete:
        shadow(request, server, req, answer)


def log_answer(request: Request, server: Server, record, req, answer: Answer, ended: Ended, role: str,
               seconds: float | None = None) -> None:
    """Queue the answer for the request log, with the version, run and dataset that produced it."""
    if server.request_log is None:
        return
    state = request.scope["state"]
    if seconds is None:
        seconds = time.monotonic() - state["started"]
    if answer.chat:
        content: Any = state.get("caller_messages") or [m.model_dump(include={"role", "content"}) for m in req.messages]
    else:
        content = req.prompts()
    applied = state.get("prompt")
    server.request_log.record(LoggedAnswer(
        response_id=answer.id, key_id=state.get("key_id"), route="chat" if answer.chat else "completions",
        model_name=server.model_name, model_version=record.version, model_role=role, run_id=record.run_id or None,
        dataset_tag=record.dataset_tag or None, request=content, answer=ended.texts, finish=",".join(ended.finish),
        prompt_tokens=ended.prompt_tokens, completion_tokens=ended.completion_tokens, seconds=seconds,
        prompt_name=applied.version.name if applied else None, prompt_version=applied.version.version if applied
        else None, prompt_role=applied.role if applied else None, citations=state.get("citations")))


def shadow(request: Request, server: Server, req, answer: Answer) -> None:
    """In a shadow rollout, let the candidate answer the same request in the background, for the log only.

    A shadow answer takes a generation slot and its memory like any request, and is skipped (never queued) when
    they are not free now.
    """
    if server.request_log is None:
        return
    target = server.shadow_target()
    if target is None:
        return
    copy = Answer(answer.model, f"{answer.id}-shadow", answer.created, answer.fingerprint, answer.chat)
    work = target.shadow(request, req, copy)
    if work is None:
        server.metrics.shadows.labels("skipped").inc()
        return
    server.shadows += 1

    async def run() -> None:
        started = time.monotonic()
        try:
            ended = await work()
            log_answer(request, server, target.record, req, copy, ended, "shadow", time.monotonic() - started)
            server.metrics.shadows.labels("answered").inc()
        except Exception as exc:
            log.warning("shadow generation failed: %s", type(exc).__name__)
            server.metrics.shadows.labels("failed").inc()
        finally:
            server.shadows -= 1

    task = asyncio.ensure_future(run())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task] = set()
"""Shadow generations running after their answers have gone (held so that they are not collected)."""
