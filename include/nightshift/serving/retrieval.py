"""Embeddings and retrieval-augmented answers on the endpoint.

``POST /v1/embeddings``: OpenAI's shape (``input`` as a text, a list of texts, token ids or lists of them;
``encoding_format`` float or base64), vectors equal to sentence-transformers' own for the same model. The
embedding model (all-MiniLM-L6-v2, or NIGHTSHIFT_EMBEDDING_MODEL) loads on the first such request or the first
retrieval, once.

``nightshift-llm+rag`` (the served name with ``+rag``): the last user message is the question; the top-k chunks of
the index of the champion's dataset version (the answering model's own ``dataset_tag``) go into that message,
numbered, within a token budget (retrieval.yaml ``context_tokens``, the window less the rest of the prompt and
``max_tokens``). The answer carries ``citations`` (an extension field OpenAI clients ignore; also
``X-Nightshift-Citations``, document ids) and the request log keeps them. ``rag: {"top_k": n}`` asks for other k.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from typing import Any, Literal

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from nightshift.retrieval.context import INSTRUCTIONS
from nightshift.serving.context import note
from nightshift.serving.protocol import OpenAIError, lone_surrogate

log = logging.getLogger(__name__)

RAG_SUFFIX = "+rag"
MAX_INPUTS = 2048
"""Texts per embeddings request, as OpenAI's API."""
MAX_REQUEST_TOKENS = 65_536
"""Tokens per embeddings request: a bound on the work one request can ask for (a few seconds on two cores)."""
MAX_INPUT_CHARS = 100_000
QUESTION_CHARS = 4_000
"""The part of the question that is embedded for retrieval (the embedding model reads 256 tokens anyway)."""


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    # Strict: true, 1.0 or "384" are not token ids or sizes.
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = Field(default=None, max_length=256)


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: StrictInt | None = Field(default=None, ge=1, le=100)


class ServingRetrieval:
    """The endpoint's embedding model and index reader; one per server."""

    def __init__(self, config, store, folder: str | None = None) -> None:
        self.config = config
        self.store = store
        self.folder = folder
        self._model = None
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self.waiting = 0

    def model(self):
        from nightshift.embeddings import embedder

        with self._lock:
            if self._model is None:
                started = time.monotonic()
                self._model = embedder(self.folder)
                log.info("embedding model loaded (%s, %d dimensions) in %.1fs", self._model.key,
                         self._model.dimensions, time.monotonic() - started)
        return self._model

    async def _run(self, request: Request, call, *args):
        """Run ``call`` on a worker thread, one at a time per server (embedding shares the CPU with generation);
        a request that cannot start before its deadline, or finds too many waiting, gets 503."""
        server = request.app.state.server
        if self._slots is None:
            self._slots = asyncio.Semaphore(1)
        if self.waiting >= server.limits.max_queue:
            raise OpenAIError(503, "Too many embedding requests are waiting; retry shortly.", code="overloaded",
                              headers={"Retry-After": "2"})
        state = request.scope["state"]
        left = state["started"] + server.limits.request_timeout_s - time.monotonic()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), max(left, 0.001))
        except TimeoutError:
            raise OpenAIError(503, "The embedding model is busy; retry shortly.", code="overloaded",
                              headers={"Retry-After": "5"}) from None
        finally:
            self.waiting -= 1
        try:
            return await run_in_threadpool(call, *args)
        finally:
            self._slots.release()

    # -- /v1/embeddings ---------------------------------------------------------------------------------------

    async def embeddings(self, request: Request, req: EmbeddingRequest) -> dict[str, Any]:
        name = self.config.embedding_model_name
        if where := lone_surrogate(req.model_dump(mode="python"), ""):
            raise OpenAIError(400, f"Invalid value for '{where[:120]}': a string holds a lone surrogate (\\ud800-"
                              "\\udfff escape without its pair), which is not text.", param="input",
                              code="invalid_unicode")
        unknown = sorted(req.model_extra or {})
        if unknown:
            raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)[:200]}",
                              param=unknown[0][:64], code="unrecognized_argument")
        if req.model != name:
            raise OpenAIError(404, f"The model `{req.model[:100]}` does not exist; embeddings come from `{name}`.",
                              param="model", code="model_not_found")
        inputs = req.input if isinstance(req.input, list) else [req.input]
        if inputs and all(isinstance(i, int) for i in inputs):
            inputs = [inputs]  # one list of token ids
        if not inputs:
            raise OpenAIError(400, "input is empty.", param="input", code="invalid_value")
        if len(inputs) > MAX_INPUTS:
            raise OpenAIError(400, f"At most {MAX_INPUTS} inputs per request, got {len(inputs)}.", param="input",
                              code="invalid_value")
        model = await self._run(request, self.model)
        if req.dimensions is not None and req.dimensions != model.dimensions:
            raise OpenAIError(400, f"Unsupported option: dimensions. {name} makes vectors of {model.dimensions} "
                              "dimensions and cannot shorten them; leave `dimensions` out.", param="dimensions",
                              code="unsupported_option")
        texts = [i for i in inputs if isinstance(i, str)]
        if texts and len(texts) != len(inputs):
            raise OpenAIError(400, "input mixes texts and token ids; send one kind.", param="input")
        if texts:
            for n, text in enumerate(texts):
                if not text:
                    raise OpenAIError(400, f"input[{n}] is empty.", param="input", code="invalid_value")
                if len(text) > MAX_INPUT_CHARS:
                    raise OpenAIError(400, f"input[{n}] is longer than {MAX_INPUT_CHARS} characters.", param="input",
                                      code="context_length_exceeded")
            counts = await self._run(request, model.count_tokens, texts)
        else:
            vocab = int(model.model.config.vocab_size)
            for n, ids in enumerate(inputs):
                if not ids:
                    raise OpenAIError(400, f"input[{n}] is empty.", param="input", code="invalid_value")
                if any(not 0 <= t < vocab for t in ids):
                    raise OpenAIError(400, f"input[{n}] holds token ids outside the vocabulary (0..{vocab - 1}).",
                                      param="input", code="invalid_token_id")
            extra = sum(len(part) for part in model._special)
            counts = [len(ids) + extra for ids in inputs]
        longest = max(range(len(counts)), key=counts.__getitem__)
        if counts[longest] > model.max_tokens:
            raise OpenAIError(400, f"input[{longest}] is {counts[longest]} tokens; {name} reads at most "
                              f"{model.max_tokens} (special tokens included). Shorten or split it.", param="input",
                              code="context_length_exceeded")
        total = sum(counts)
        if total > MAX_REQUEST_TOKENS:
            raise OpenAIError(400, f"The inputs are {total} tokens; at most {MAX_REQUEST_TOKENS} per request.",
                              param="input", code="context_length_exceeded")
        vectors = await self._run(request, model.embed if texts else model.embed_ids, texts or inputs)
        note(request, prompt_tokens=total)
        request.app.state.server.metrics.tokens.labels("embedding", "embedding").inc(total)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": total, "total_tokens": total}}

    # -- retrieval-augmented answers ----------------------------------------------------------------------------

    async def ground(self, request: Request, req, target, options: Any = None) -> None:
        """Put the retrieved chunks into ``req``'s last user message (in place) and note the citations.
        ``options``: the request's ``rag`` field (``{"top_k": n}``, or true)."""
        from nightshift.retrieval.context import ground, special_tokens

        options = _rag_options(options)
        k = options.top_k or self.config.top_k
        if k > self.config.max_top_k:
            raise OpenAIError(400, f"rag.top_k may be at most {self.config.max_top_k} (retrieval.yaml max_top_k).",
                              param="rag.top_k", code="invalid_value")
        at = next((i for i in range(len(req.messages) - 1, -1, -1) if req.messages[i].role == "user"), None)
        if at is None:
            raise OpenAIError(400, "A retrieval-augmented request needs a user message: its last one is the "
                              "question.", param="messages", code="invalid_value")
        message = req.messages[at]
        question = message.content if isinstance(message.content, str) else "".join(
            part.text or "" for part in message.content or [])
        if not question.strip():
            raise OpenAIError(400, "The last user message is empty: there is nothing to retrieve for.",
                              param="messages", code="invalid_value")
        loaded = getattr(target, "loaded", None) or target.model
        tag = getattr(loaded.record, "dataset_tag", "") or ""
        if not tag:
            raise OpenAIError(503, "The served model names no dataset version, so there is no index to retrieve "
                              "from.", code="index_unavailable")
        model = await self._run(request, self.model)
        try:
            hits = await self._run(request, self._search, model, question[:QUESTION_CHARS], tag, k)
        except LookupError:
            raise OpenAIError(503, f"No index of {tag} (the served model's dataset version) for "
                              f"{self.config.embedding_model_name} yet: ingest_corpus builds it.",
                              code="index_unavailable", headers={"Retry-After": "60"}) from None
        except Exception as exc:  # the vector store is down or refuses
            log.warning("retrieval failed: %s", type(exc).__name__)
            raise OpenAIError(503, "The vector store is unavailable; retry later.", code="index_unavailable",
                              headers={"Retry-After": "10"}) from None
        tokenizer = getattr(loaded, "tokenizer", None)
        tokenize, detokenize = _token_functions(tokenizer)
        budget = await run_in_threadpool(self._budget, request, req, target, loaded, tokenize)
        grounding = await run_in_threadpool(ground, question, hits, self.config.min_score, budget, tokenize,
                                            detokenize, special_tokens(tokenizer))
        if grounding.citations:
            # The request log keeps the caller's messages (what feedback and harvests read), not the documents.
            note(request, caller_messages=[m.model_dump(include={"role", "content"}) for m in req.messages])
            req.messages[at] = message.model_copy(update={"content": grounding.prompt})
        note(request, citations=grounding.citations, rag={"index": tag, "top_k": k, "budget": budget,
                                                          "context_tokens": grounding.context_tokens})

    def _search(self, model, question: str, tag: str, k: int):
        vector = model.embed([question])[0]
        return self.store.search(tag, model.key, vector, k)

    def _budget(self, request: Request, req, target, loaded, tokenize) -> int:
        """Tokens of documents the prompt may hold: retrieval.yaml's budget, within what the window leaves after the
        conversation as the model reads it (chat template and prompt template included), the instructions and the
        answer (its max_tokens, else a quarter of the window)."""
        window = int(getattr(loaded, "window", 0) or 2048)
        asked = req.requested_max_tokens()
        answer = asked if asked else window // 4
        if hasattr(target, "prompts"):  # this process's model: the exact prompt it would read without documents
            conversation = len(target.prompts(req, True, request.scope["state"].get("prompt"))[0])
        else:  # an engine's: the words counted generously, and room for a chat template
            text = " ".join(m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or
                                                                                 []) for m in req.messages)
            conversation = len(tokenize(text[:200_000])) + 128 + 8 * len(req.messages)
        overhead = len(tokenize(INSTRUCTIONS + "\n\nQuestion: ")) + 8
        return max(0, min(self.config.context_tokens, window - answer - conversation - overhead))


def _rag_options(raw: Any) -> RagOptions:
    if raw is None or raw is True:
        return RagOptions()
    try:
        return RagOptions.model_validate(raw)
    except Exception:
        raise OpenAIError(400, "rag must be an object like {\"top_k\": 4}.", param="rag", code="invalid_value") \
            from None


def _token_functions(tokenizer):
    """Return (tokenize, detokenize) in the answering model's tokens; an engine's model (no tokenizer here) is
    counted in pieces of two characters, which over-counts every tokenizer's tokens of prose, so the budget holds."""
    if tokenizer is None:
        return (lambda text: [text[i:i + 2] for i in range(0, len(text), 2)]), "".join
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
