"""Decoding: a prompt continued token by token, stoppable within one token.

The decode loop is written here rather than calling ``model.generate()``: generation must stop within one
token when the client disconnects, a stop sequence appears or the deadline passes; seeded sampling must not
share torch's global random generator with concurrent requests; and log-probabilities must come from the
raw model output without keeping every step's logits. It is transformers' own forward pass, cache
(``DynamicCache``) and logits warpers, driven one token at a time; greedy output is tested to equal
``generate()``'s. ``batching.py`` runs many sequences through one batched forward pass.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nightshift.serving.loading import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    """Alternatives to report per token (0: only the chosen token's); None: no log-probabilities."""
    echo: bool = False
    """Completions: return the prompt too, with its log-probabilities when ``logprobs`` is set."""


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[str, float]]
    offset: int
    """Character offset of the token in the returned text."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    """``stop``, ``length``, ``cancelled`` (client gone) or ``timeout``."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_text: str = ""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class Detokenizer:
    """Turns token ids into text incrementally, holding back bytes that do not yet form a character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        """False for an echoed prompt: its control tokens are part of what the client sent."""
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _tail(self) -> tuple[str, str]:
        """Return the text of the last emitted context alone, and with the tokens not yet emitted."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        return (decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip),
                decode(self.ids[self.prefix_offset :], skip_special_tokens=skip))

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix, full = self._tail()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Return what is left undecoded at the end (possibly an incomplete character)."""
        prefix, full = self._tail()
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class _EchoText:
    """An echoed prompt's text, read token by token as the prompt is prefilled.

    The echo keeps the prompt's control tokens (they are what the client sent), and each token's stretch of the
    text is exact (a token that ends inside a character holds "", the one completing it the whole character), so
    that the log-probability entries join to the echoed prompt.
    """

    def __init__(self, tokenizer, ids: list[int]) -> None:
        self.detok = Detokenizer(tokenizer, skip_special_tokens=False)
        self.ids = ids
        self.offsets: list[int] = []
        """Where each token read so far begins in the text."""

    @property
    def text(self) -> str:
        return self.detok.text

    def read(self, upto: int) -> None:
        """Read the tokens before ``upto``; at the end of the prompt, what is left undecoded too."""
        upto = min(upto, len(self.ids))
        while len(self.offsets) < upto:
            self.offsets.append(len(self.detok.text))
            self.detok.push(self.ids[len(self.offsets) - 1])
        if upto == len(self.ids) and self.detok.read_offset < len(self.ids):
            self.detok.flush()

    def piece(self, index: int) -> str:
        """Token ``index``'s stretch of the text (read up to the token after it, or to the end)."""
        end = self.offsets[index + 1] if index + 1 < len(self.offsets) else len(self.detok.text)
        return self.detok.text[self.offsets[index]:end]


def _stop_position(text: str, stops: tuple[str, ...], searched_from: int) -> int:
    """Return where the earliest stop sequence starts in ``text`` (looking from ``searched_from``), or -1."""
    found = [p for s in stops if (p := text.find(s, max(0, searched_from - len(s) + 1))) >= 0]
    return min(found) if found else -1


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Return how many trailing characters could still become a stop sequence."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


class Sampler:
    """Chooses the next token: logit bias, OpenAI's presence and frequency penalties, temperature, top-p.

    Each request has its own seeded ``torch.Generator``, so concurrent requests never share random state.
    """

    def __init__(self, params: SamplingParams, vocab: int) -> None:
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.params = params
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else secrets.randbits(63))
        self.warpers = []
        if params.temperature > 0 and params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.temperature > 0 and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.bias = None
        if params.logit_bias:
            self.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long),
                         torch.tensor(list(params.logit_bias.values()), dtype=torch.float32))
        penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.counts = torch.zeros(vocab or 1, dtype=torch.float32) if penalties else None

    def choose(self, logits) -> int:
        """Return the next token for these raw logits, and remember it for the penalties."""
        import torch

        p = self.params
        scores = logits.clone()
        if self.bias is not None:
            scores[self.bias[0]] += self.bias[1]
        if self.counts is not None:
            scores -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        if p.temperature == 0:
            token = int(torch.argmax(scores))
        else:
            warped = scores[None]
            for warper in self.warpers:
                warped = warper(None, warped)
            token = int(torch.multinomial(torch.softmax(warped[0], dim=-1), 1, generator=self.generator))
        if self.counts is not None:
            self.counts[token] += 1
        return token


class Stopped(Exception):
    """Generation ended early: the client left or the deadline passed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sequence:
    """One prompt being continued: its sampler, detokenizer, stop handling and result.

    The forward passes are not here: ``generate`` runs one sequence on its own cache, the batch scheduler
    (``batching.py``) runs many through one batched forward. Either way ``prefill`` runs the prompt and
    ``step`` takes the logits of the next position and returns the token to feed back, or None when the
    sequence has finished (``result`` is then complete).
    """

    def __init__(self, loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
                 deadline: float, on_delta: Callable[[str, list[TokenLogprob]], None] | None = None) -> None:
        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancel = cancel
        self.deadline = deadline
        self.on_delta = on_delta
        self.result = GenerationResult(token_ids=[], text="", finish_reason="length")
        self.sampler = Sampler(params, loaded.shape.vocab)
        self.detok = Detokenizer(loaded.tokenizer)
        self.spans: list[tuple[TokenLogprob | None, int, int]] = []  # (logprob entry, text start, text end)
        self.emitted = 0
        self.cut_at_stop = False
        self.finished = False
        self.prefilled = 0
        """Prompt tokens run through the cache so far."""

    @property
    def bound(self) -> int:
        """The most tokens this sequence can hold in its cache: its prompt and max_tokens (what it is charged)."""
        return len(self.prompt_ids) + self.params.max_tokens

    def check(self) -> None:
        if self.cancel.is_set():
            raise Stopped("cancelled")
        if time.monotonic() > self.deadline:
            raise Stopped("timeout")

    def _entry(self, lp_row, token_id: int, offset: int, text: str | None = None) -> TokenLogprob:
        """The log-probability entry of ``token_id``; ``text``: its stretch of the echoed prompt, when echoed."""
        import torch

        tokenizer = self.loaded.tokenizer
        top: list[tuple[str, float]] = []
        if self.params.logprobs:
            values, indices = torch.topk(lp_row, self.params.logprobs)
            top = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
        return TokenLogprob(token_id, tokenizer.decode([token_id]) if text is None else text,
                            float(lp_row[token_id]), top, offset)

    def prefill(self, chunk: int):
        """Run the prompt through a fresh cache; return ``(cache, logits of the next token)``.

        Returns ``(None, None)`` when the sequence is already finished (nothing to generate, or stopped).
        """
        steps = self.prefill_steps(chunk)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, chunk: int):
        """``prefill`` one chunk at a time: a generator that yields after each chunk's forward pass and returns
        what ``prefill`` returns, so that the scheduler can decode running sequences between chunks."""
        import torch
        from transformers import DynamicCache

        params, prompt_ids, model = self.params, self.prompt_ids, self.loaded.model
        n = len(prompt_ids)
        score_prompt = params.echo and params.logprobs is not None
        # With nothing to generate and no prompt log-probabilities asked for, no forward pass is needed.
        run_model = params.max_tokens > 0 or score_prompt
        echo = _EchoText(self.loaded.tokenizer, prompt_ids) if params.echo else None
        try:
            cache = DynamicCache(config=model.config) if run_model else None
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            logits = None
            # Chunk by chunk, the echoed text too: a long echoed prompt costs a running stream one chunk at a time.
            for start in range(0, n, chunk):
                self.check()
                end = min(n, start + chunk)
                if echo is not None:
                    # The chunk's entries reach token `end`, whose stretch ends where the next token begins.
                    echo.read(end + 2)
                    if start == 0 and score_prompt:
                        self.result.prompt_logprobs.append(TokenLogprob(prompt_ids[0], echo.piece(0), None, [], 0))
                if run_model:
                    # inference_mode per chunk, never across a yield: the scheduler runs other work between chunks.
                    with torch.inference_mode():
                        out = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True,
                                    logits_to_keep=0 if score_prompt else 1)
                        chunk_logits = out.logits[0].float()
                        if score_prompt:
                            rows = torch.log_softmax(chunk_logits, dim=-1)
                            for i in range(end - start):
                                target = start + i + 1
                                if target < n:
                                    self.result.prompt_logprobs.append(self._entry(
                                        rows[i], prompt_ids[target], echo.offsets[target], echo.piece(target)))
                        logits = chunk_logits[-1]
                        del out, chunk_logits
                self.prefilled = end
                if end < n:
                    yield
            if echo is not None:
                self.result.prompt_text = echo.text
        except Stopped as stopped:
            self.finish(stopped.reason)
            return None, None
        if params.max_tokens == 0:
            self.finish("length")
            return None, None
        return cache, logits

    def step(self, logits) -> int | None:
        """Choose the next token from ``logits``; return it, or None when the sequence has finished."""
        import torch

        try:
            self.check()
        except Stopped as stopped:
            self.finish(stopped.reason)
            return None
        params, detok = self.params, self.detok
        token = self.sampler.choose(logits)
        if token in self.loaded.eos_ids:
            self.finish("stop")
            return None
        self.result.token_ids.append(token)
        before = len(detok.text)
        detok.push(token)
        lp = self._entry(torch.log_softmax(logits, dim=-1), token, before) if params.logprobs is not None else None
        self.spans.append((lp, before, len(detok.text)))
        position = _stop_position(detok.text, params.stop, before) if params.stop else -1
        if position >= 0:
            detok.text = detok.text[:position]
            self.cut_at_stop = True
            self.finish("stop")
            return None
        if self.on_delta is not None:
            safe = len(detok.text) - _held_back(detok.text, params.stop)
            if safe > self.emitted:
                self.on_delta(detok.text[self.emitted : safe], _spans_within(self.spans, self.emitted, safe))
                self.emitted = safe
        if len(self.result.token_ids) >= params.max_tokens:
            self.finish("length")
            return None
        return token

    def finish(self, reason: str) -> None:
        """End the sequence: flush the detokenizer, fill in the result and emit what is left."""
        if self.finished:
            return
        self.finished = True
        result = self.result
        result.finish_reason = reason
        if not self.cut_at_stop:
            self.detok.flush()
        result.text = self.detok.text
        result.logprobs = [lp for lp, start, _ in self.spans if lp is not None and start < len(result.text)]
        if self.on_delta is not None and len(result.text) > self.emitted:
            self.on_delta(result.text[self.emitted :], _spans_within(self.spans, self.emitted, len(result.text)))
            self.emitted = len(result.text)


def generate(
    loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event, deadline: float,
    prefill_chunk: int = 512, on_delta: Callable[[str, list[TokenLogprob]], None] | None = None,
) -> GenerationResult:
    """Continue ``prompt_ids`` alone; call ``on_delta(text, logprobs)`` as text becomes final; return the result."""
    import torch

    sequence = Sequence(loaded, prompt_ids, params, cancel, deadline, on_delta)
    cache, logits = sequence.prefill(prefill_chunk)
    with torch.inference_mode():
        while logits is not None:
            token = sequence.step(logits)
            if token is None:
                break
            out = loaded.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1].float()
            del out
    return sequence.result


def _spans_within(spans, start: int, end: int) -> list[TokenLogprob]:
    return [lp for lp, s, e in spans if lp is not None and s >= start and s < end]
