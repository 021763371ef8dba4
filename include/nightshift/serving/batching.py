"""Continuous batching: every sequence in flight advances by one token in one batched forward pass.

One scheduler thread owns the forward passes. A request's prompts arrive as ``Sequence`` objects
(``decoding.py``); the scheduler waits a short window (``NIGHTSHIFT_SERVE_BATCH_WAIT_MS``) after the first
arrival for others, runs each new prompt through its own cache in chunks of ``prefill_chunk`` tokens, one
chunk per step between the decode steps of the running batches (chunked prefill: a long prompt, or a scoring
request's, delays running streams by one chunk, not by its whole length), then merges it into the running
batch of its model: the key/value caches are left-padded to a common length and an attention mask hides the
padding, so sequences of different lengths, started at different times, decode together. A sequence that
finishes, is cancelled or runs out of time leaves the batch at the next step, and the columns only padding
needs are trimmed. Sequences of different models (a champion and a canary, or the old and new champion
during a swap) form separate batches, stepped in turn.

Padding is memory too: a short row in a batch with a long one holds as many cache columns as the long one.
Admission charges each request for its own tokens (prompt plus max_tokens); the scheduler charges the
padding a batch may come to hold (every row as wide as the widest row's reach) to the same budget
(``padding_bytes``, which admission adds to what is in use). A prompt joins the batch of its model whose
padding grows least, when the budget has that much free; otherwise it starts a batch of its own, stepped in
turn with the others, and pays no padding.

Written here rather than using transformers' continuous-batching manager (``generate_batch``): that one
applies one generation config to every request, while each OpenAI request brings its own temperature,
seed, penalties, logit bias, stop sequences, log-probabilities and deadline, and must stop within one token
when its client leaves. The forward pass, the cache and the logits processors are transformers' own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from nightshift.serving.decoding import Sequence
from nightshift.serving.loading import LoadedModel

log = logging.getLogger(__name__)


def _pad_left(tensor, columns: int, dim: int):
    """Return ``tensor`` with ``columns`` zero entries prepended along ``dim``."""
    import torch

    if columns <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Batch:
    """The sequences of one model decoding together, with their left-padded cache and attention mask."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[tuple[Sequence, Future]] = []
        self.cache = None
        self.mask = None
        """[rows, columns] int64: 1 where a cache column holds one of the row's tokens, 0 for padding."""
        self.logits = None
        """[rows, vocab]: the next-token logits of every row."""
        self.padding: list[int] = []
        """Per row: the cache columns on its left that are padding."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def padding_tokens(self, joining: tuple[Sequence, int] | None = None) -> int:
        """Return the padding cells (rows x columns) this batch may come to hold, with ``joining`` (a sequence and
        its prefilled length) merged in when given: every row as wide as the row that reaches furthest."""
        paddings = list(self.padding)
        bounds = [sequence.bound for sequence, _ in self.rows]
        if joining is not None:
            sequence, length = joining
            target = max(self.width, length)
            paddings = [p + target - self.width for p in paddings] + [target - length]
            bounds.append(sequence.bound)
        if not bounds:
            return 0
        reach = max(p + b for p, b in zip(paddings, bounds, strict=True))
        return max(0, len(bounds) * reach - sum(bounds))

    def kv_bytes(self) -> int:
        """Return the bytes the batch's key/value cache holds now."""
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def add(self, sequence: Sequence, future: Future, cache, logits) -> None:
        """Merge a prefilled sequence (its own batch-1 cache and last logits) into the batch."""
        import torch

        length = cache.get_seq_length()
        if self.cache is None:
            self.cache = cache
            self.mask = torch.ones((1, length), dtype=torch.long)
            self.logits = logits[None]
            self.rows.append((sequence, future))
            self.padding = [0]
            return
        width = self.mask.shape[1]
        target = max(width, length)
        self.padding = [p + target - width for p in self.padding] + [target - length]
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, target - width, 2), _pad_left(theirs.keys, target - length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, target - width, 2),
                                     _pad_left(theirs.values, target - length, 2)])
        row = torch.cat([torch.zeros(target - length, dtype=torch.long), torch.ones(length, dtype=torch.long)])
        self.mask = torch.cat([_pad_left(self.mask, target - width, 1), row[None]])
        self.logits = torch.cat([self.logits, logits[None]])
        self.rows.append((sequence, future))

    def step(self) -> list[tuple[Sequence, Future]]:
        """Give every row its next token and run one forward pass; return the rows that finished."""
        import torch

        tokens: list[int] = []
        keep: list[int] = []
        done: list[tuple[Sequence, Future]] = []
        for index, (sequence, future) in enumerate(self.rows):
            try:
                token = sequence.step(self.logits[index])
            except Exception as exc:  # one request's failure must not end the others
                log.exception("a sequence failed and leaves the batch")
                future.set_exception(exc)
                continue
            if token is None:
                done.append((sequence, future))
            else:
                keep.append(index)
                tokens.append(token)
        if len(keep) < len(self.rows):
            self._select(keep)
        if not self.rows:
            return done
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        with torch.inference_mode():
            out = self.loaded.model(input_ids=torch.tensor(tokens)[:, None], attention_mask=self.mask,
                                    position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()
        return done

    def _select(self, keep: list[int]) -> None:
        import torch

        self.rows = [self.rows[i] for i in keep]
        self.padding = [self.padding[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.logits = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        # Columns that are padding in every remaining row are dropped.
        first = int(self.mask.any(dim=0).long().argmax())
        if first > 0:
            self.padding = [p - first for p in self.padding]
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def fail(self, exc: BaseException) -> None:
        for _sequence, future in self.rows:
            if not future.done():
                future.set_exception(exc)
        self.rows = []
        self.padding = []
        self.cache = self.mask = self.logits = None


def _padding_bytes(loaded: LoadedModel, tokens: int) -> int:
    """What ``tokens`` cells of padding cost, counted as admission counts a request's own tokens (twice: a
    layer's cache is copied as it grows)."""
    return 2 * loaded.shape.kv_bytes_per_token * tokens


class BatchScheduler:
    """Runs every submitted sequence to completion in continuous batches, on one thread.

    ``submit`` returns a ``concurrent.futures.Future`` of the ``GenerationResult``. ``on_step(rows)`` is
    called after every batched step with the number of rows that took part (for metrics). ``free(loaded)``
    returns the bytes of ``loaded``'s request budget not yet charged (None: unbounded); ``on_release()`` is
    called when the padding charged goes down, so that waiting requests are looked at again.
    """

    def __init__(self, prefill_chunk: int = 512, wait_s: float = 0.005,
                 on_step: Callable[[int], None] | None = None,
                 free: Callable[[LoadedModel], int] | None = None,
                 on_release: Callable[[], None] | None = None) -> None:
        self.prefill_chunk = prefill_chunk
        self.wait_s = wait_s
        self.on_step = on_step
        self.free = free
        self.on_release = on_release
        self._inbox: queue.SimpleQueue[tuple[Sequence, Future] | None] = queue.SimpleQueue()
        self._batches: list[Batch] = []
        self._prefilling: deque[tuple[Sequence, Future, Any, int]] = deque()
        """Sequences whose prompts are being run through, one chunk per scheduler step (chunked prefill)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.running = 0
        """Sequences in the batches now."""
        self.padding_bytes = 0
        """Memory charged for the padding the batches may come to hold (admission counts it as in use)."""
        self.kv_held_bytes = 0
        """What the batches' key/value caches hold now."""
        self.kv_held_peak_bytes = 0
        self.over_charge_peak_bytes = 0
        """The most the batches' caches ever held beyond what was charged for them (rows and padding): 0."""

    def submit(self, sequence: Sequence) -> Future:
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the scheduler has stopped"))
            return future
        self._inbox.put((sequence, future))
        return future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _take(self) -> list[tuple[Sequence, Future]]:
        """Return the sequences that arrived; when idle, block for the first and wait the window for others."""
        arrived: list[tuple[Sequence, Future]] = []
        if not self._batches and not self._prefilling:
            item = self._inbox.get()
            if item is None:
                return arrived
            arrived.append(item)
            if self.wait_s > 0:
                time.sleep(self.wait_s)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return arrived
            if item is not None:
                arrived.append(item)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for sequence, future in self._take():
                    self._start_prefill(sequence, future)
                # One chunk of one prompt, then one token for every running sequence: a long prompt (or a
                # scoring request's) delays the streams already running by one chunk's forward pass at most.
                self._prefill_chunk()
                for batch in list(self._batches):
                    rows = len(batch)
                    try:
                        finished = batch.step()
                    except Exception as exc:
                        log.exception("a batched forward pass failed; its %d sequences fail", rows)
                        batch.fail(exc)
                        finished = []
                    for sequence, future in finished:
                        future.set_result(sequence.result)
                    if not batch.rows:
                        self._batches.remove(batch)
                    if self.on_step is not None:
                        self.on_step(rows)
                self.running = sum(len(b) for b in self._batches) + len(self._prefilling)
                self._account()
            except Exception:  # the loop itself must survive anything
                log.exception("batch scheduler error")
        self._drain()

    def _start_prefill(self, sequence: Sequence, future: Future) -> None:
        if future.set_running_or_notify_cancel():
            chunk, weight = self.prefill_chunk, 1
            if sequence.params.echo and sequence.params.logprobs is not None:
                # A scoring prompt's token costs more than a forward pass: the logits and log-softmax over the whole
                # vocabulary, and its log-probability entry. It counts four times against a step's budget, so that
                # its steps are about as short as a plain prompt's.
                chunk, weight = max(16, chunk // 4), 4
            self._prefilling.append((sequence, future, sequence.prefill_steps(chunk), weight))

    def _prefill_chunk(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens, oldest prompt first (several short prompts share one
        step); a prompt done joins its model's batch."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            sequence, _future, _steps, weight = self._prefilling[0]
            before = sequence.prefilled
            self._advance_prefill()
            budget -= max(1, sequence.prefilled - before) * weight

    def _advance_prefill(self) -> None:
        sequence, future, steps, _weight = self._prefilling[0]
        try:
            next(steps)
            return
        except StopIteration as done:
            cache, logits = done.value
        except Exception as exc:
            log.exception("prefill failed")
            self._prefilling.popleft()
            future.set_exception(exc)
            return
        self._prefilling.popleft()
        if logits is None:
            future.set_result(sequence.result)
            return
        self._batch_for(sequence, cache.get_seq_length()).add(sequence, future, cache, logits)
        self._account()

    def _batch_for(self, sequence: Sequence, length: int) -> Batch:
        """Return the batch of the sequence's model whose padding grows least, if the budget can pay for that
        growth; else a new batch of its own."""
        loaded = sequence.loaded
        best: tuple[int, Batch] | None = None
        for batch in self._batches:
            if batch.loaded is loaded:
                grows = batch.padding_tokens((sequence, length)) - batch.padding_tokens()
                if best is None or grows < best[0]:
                    best = (grows, batch)
        if best is not None:
            grows, batch = best
            if grows <= 0 or self.free is None or _padding_bytes(loaded, grows) <= self.free(loaded):
                return batch
        batch = Batch(loaded)
        self._batches.append(batch)
        return batch

    def _account(self) -> None:
        """Charge the padding the batches may come to hold; measure what their caches hold against the charge."""
        padding = sum(_padding_bytes(b.loaded, b.padding_tokens()) for b in self._batches)
        released = padding < self.padding_bytes
        self.padding_bytes = padding
        held = sum(b.kv_bytes() for b in self._batches)
        charged = padding + sum(_padding_bytes(b.loaded, s.bound) for b in self._batches for s, _ in b.rows)
        self.kv_held_bytes = held
        self.kv_held_peak_bytes = max(self.kv_held_peak_bytes, held)
        self.over_charge_peak_bytes = max(self.over_charge_peak_bytes, held - charged)
        if released and self.on_release is not None:
            self.on_release()

    def _drain(self) -> None:
        error = RuntimeError("the endpoint is shutting down")
        for batch in self._batches:
            batch.fail(error)
        self._batches.clear()
        while self._prefilling:
            _sequence, future, steps, _weight = self._prefilling.popleft()
            steps.close()
            if not future.done():
                future.set_exception(error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[1].done():
                item[1].set_exception(error)

