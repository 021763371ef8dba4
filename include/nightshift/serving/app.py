"""OpenAI-compatible REST endpoint serving the registry's champion, hot-swapped when the alias moves.

Routes: ``GET /healthz``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream``). The answering version is in ``system_fingerprint`` (``v<N>``) and in the
``X-Nightshift-Model-Version`` header.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from nightshift.records import ModelVersionRecord
from nightshift.registry.mlflow_registry import ModelRegistry

log = logging.getLogger(__name__)

MAX_TOKENS_CAP = 1024


@dataclass
class LoadedModel:
    record: ModelVersionRecord
    model: Any
    tokenizer: Any
    loaded_at: float


class ChampionWatcher:
    """Keeps the champion loaded and swaps in a new one when the registry alias moves."""

    def __init__(self, registry: ModelRegistry, cache_dir: Path, poll_seconds: float = 5.0) -> None:
        self.registry = registry
        self.cache_dir = cache_dir
        self.poll_seconds = poll_seconds
        self.current: LoadedModel | None = None
        self.error: str | None = None
        self.generate_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the champion if the alias points somewhere new; return True when the model changed."""
        try:
            record = self.registry.champion()
        except Exception as exc:  # the registry may be briefly unavailable; keep serving what we have
            self.error = f"registry unavailable: {exc}"
            log.warning("%s", self.error)
            return False
        if record is None:
            self.error = f"no model carries the alias {self.registry.alias!r} yet"
            return False
        if self.current and self.current.record.version == record.version:
            return False
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        folder = self.registry.download(record, self.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        previous = self.current.record.label if self.current else "nothing"
        self.current = LoadedModel(record, model, tokenizer, time.time())
        self.error = None
        log.info("serving %s (was %s), loaded in %.1fs", record.label, previous, time.monotonic() - started)
        return True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="champion-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("could not load the new champion; still serving the previous one")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_app(registry: ModelRegistry, cache_dir: Path, poll_seconds: float = 5.0, watch: bool = True) -> FastAPI:
    """Return the FastAPI application serving ``registry``'s champion."""
    watcher = ChampionWatcher(registry, cache_dir, poll_seconds)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if watch:
            watcher.start()
        else:
            watcher.refresh()
        yield
        watcher.stop()

    app = FastAPI(title="nightshift serving", version="1", lifespan=lifespan)
    app.state.watcher = watcher
    accepted = {registry.model_name, f"{registry.model_name}@{registry.alias}", registry.alias}

    def current_model(requested: str) -> LoadedModel:
        if requested not in accepted:
            raise HTTPException(
                404, f"The model `{requested}` does not exist; this endpoint serves {registry.model_name}"
            )
        loaded = watcher.current
        if loaded is None:
            raise HTTPException(503, watcher.error or "model is loading")
        return loaded

    @app.exception_handler(HTTPException)
    async def openai_error(_request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": exc.detail, "type": kind, "code": exc.status_code}}, exc.status_code)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        loaded = watcher.current
        return {
            "status": "ok" if loaded else "no_model",
            "model": registry.model_name,
            "version": loaded.record.version if loaded else None,
            "dataset": loaded.record.dataset_tag if loaded else None,
            "detail": watcher.error,
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        loaded = watcher.current
        data = []
        if loaded:
            data.append({
                "id": registry.model_name, "object": "model", "created": int(loaded.loaded_at),
                "owned_by": "nightshift", "version": loaded.record.version, "alias": registry.alias,
                "dataset": loaded.record.dataset_tag,
            })
        return {"object": "list", "data": data}

    def generate(loaded: LoadedModel, prompt_ids: list[int], req: _Sampling, streamer=None) -> list[int]:
        import torch

        if req.n != 1:
            raise HTTPException(400, "n > 1 is not supported")
        max_new = min(req.max_completion_tokens or req.max_tokens or 256, MAX_TOKENS_CAP)
        sampling = req.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sampling}
        if sampling:
            kwargs.update(temperature=req.temperature, top_p=req.top_p)
            if req.seed is not None:
                torch.manual_seed(req.seed)
        tok = loaded.tokenizer
        with watcher.generate_lock, torch.no_grad():
            out = loaded.model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                pad_token_id=tok.eos_token_id, streamer=streamer, **kwargs,
            )
        return out[0, len(prompt_ids) :].tolist()

    def respond(loaded: LoadedModel, prompt_ids: list[int], req: _Sampling, chat: bool):
        tok = loaded.tokenizer
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        fingerprint = f"v{loaded.record.version}"
        headers = {"X-Nightshift-Model-Version": str(loaded.record.version)}
        if req.stream:
            return StreamingResponse(
                _stream(loaded, prompt_ids, req, chat, rid, created, fingerprint), media_type="text/event-stream",
                headers=headers,
            )
        new_ids = generate(loaded, prompt_ids, req)
        text, stopped = _cut_at_stop(tok.decode(new_ids, skip_special_tokens=True), req.stop)
        ended = stopped or (new_ids and new_ids[-1] == tok.eos_token_id)
        finish = "stop" if ended else "length"
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(new_ids),
                 "total_tokens": len(prompt_ids) + len(new_ids)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            body = {"id": rid, "object": "chat.completion", "created": created, "model": registry.model_name,
                    "system_fingerprint": fingerprint, "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": "text_completion", "created": created, "model": registry.model_name,
                    "system_fingerprint": fingerprint, "choices": [choice], "usage": usage}
        return JSONResponse(body, headers=headers)

    def _stream(loaded, prompt_ids, req, chat, rid, created, fingerprint) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        produced: list[list[int]] = []

        def run() -> None:
            try:
                produced.append(generate(loaded, prompt_ids, req, streamer))
            except BaseException as exc:  # surfaced to the client below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": created, "model": registry.model_name,
                    "system_fingerprint": fingerprint, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            yield chunk(None, None, first=True)
        text, emitted, finish = "", 0, "length"
        for piece in streamer:
            text += piece
            cut, stopped = _cut_at_stop(text, req.stop)
            if len(cut) > emitted:
                yield chunk(cut[emitted:], None)
                emitted = len(cut)
            if stopped:
                finish = "stop"
                break
        else:
            worker.join()
            if produced and produced[0] and produced[0][-1] == loaded.tokenizer.eos_token_id:
                finish = "stop"
        if errors:
            yield f"data: {json.dumps({'error': {'message': str(errors[0]), 'type': 'server_error'}})}\n\n"
        else:
            yield chunk(None, finish)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        loaded = current_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in req.messages]
        prompt_ids = list(loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        ))
        return respond(loaded, prompt_ids, req, chat=True)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        loaded = current_model(req.model)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise HTTPException(400, "exactly one prompt per request is supported")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise HTTPException(400, "prompt is empty")
        return respond(loaded, prompt_ids, req, chat=False)

    return app
