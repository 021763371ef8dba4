"""Continuous batching: batched sequences produce what each would alone, join and leave at any step, fail alone."""

import threading
import time

import pytest

from nightshift.records import ModelVersionRecord
from nightshift.serving.batching import BatchScheduler
from nightshift.serving.decoding import SamplingParams, Sequence, generate
from nightshift.serving.loading import load_model
from nightshift.settings import ServingLimits

RECORD = ModelVersionRecord(name="nightshift-llm", version=1, run_id="r", source="s", dataset_tag="d", fingerprint="")
FOREVER = float("inf")
PROMPTS = ["The observatory opens at", "A", "Ships leave the harbour when the tide turns, and the keeper logs",
           "Rain", "Every evening the lighthouse"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(RECORD, tiny_model, ServingLimits(), runtime_bytes=0)


@pytest.fixture
def scheduler():
    steps: list[int] = []
    s = BatchScheduler(prefill_chunk=512, wait_s=0.02, on_step=steps.append)
    s.steps = steps
    s.start()
    yield s
    s.stop()


def ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def alone(loaded, text, params):
    return generate(loaded, ids(loaded, text), params, threading.Event(), FOREVER)


def test_batched_greedy_equals_each_sequence_alone(loaded, scheduler):
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=1)
    expected = [alone(loaded, text, params) for text in PROMPTS]
    futures = [scheduler.submit(Sequence(loaded, ids(loaded, text), params, threading.Event(), FOREVER))
               for text in PROMPTS]
    got = [f.result(timeout=60) for f in futures]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in e.logprobs], abs=1e-3)
    assert max(scheduler.steps) == len(PROMPTS), "the five sequences never ran in one batch"


def test_sequences_join_a_running_batch_and_leave_it_at_different_lengths(loaded, scheduler):
    lengths = [30, 3, 12, 25, 1]
    expected = [alone(loaded, text, SamplingParams(max_tokens=n, temperature=0)).token_ids
                for text, n in zip(PROMPTS, lengths, strict=True)]
    futures = []

    def submit(i):
        futures.append(scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[i]),
                                                 SamplingParams(max_tokens=lengths[i], temperature=0),
                                                 threading.Event(), FOREVER)))

    class First(Sequence):
        """Submits the others while it decodes: after its 2nd, 4th, 6th and 8th token."""

        def step(self, logits):
            token = super().step(logits)
            n = len(self.result.token_ids)
            if n in (2, 4, 6, 8) and token is not None:
                submit(n // 2)
            return token

    first = scheduler.submit(First(loaded, ids(loaded, PROMPTS[0]), SamplingParams(max_tokens=lengths[0],
                             temperature=0), threading.Event(), FOREVER))
    got = [first.result(timeout=60).token_ids] + [f.result(timeout=60).token_ids for f in futures]
    assert got == expected
    assert [len(g) for g in got] == lengths
    assert max(scheduler.steps) >= 3


def test_seeded_sampling_in_a_batch_equals_sampling_alone(loaded, scheduler):
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed) for seed in (1, 2, 3)]
    expected = [alone(loaded, PROMPTS[0], p).token_ids for p in params]
    futures = [scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), p, threading.Event(), FOREVER))
               for p in params]
    assert [f.result(timeout=60).token_ids for f in futures] == expected


def test_a_cancelled_sequence_leaves_and_the_others_finish(loaded, scheduler):
    cancel = threading.Event()
    params = SamplingParams(max_tokens=40, temperature=0)
    expected = alone(loaded, PROMPTS[2], params).token_ids
    deltas: list[str] = []

    def on_delta(text, _lps):
        deltas.append(text)
        if len(deltas) == 3:
            cancel.set()

    leaving = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), params, cancel, FOREVER, on_delta))
    staying = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[2]), params, threading.Event(), FOREVER))
    left = leaving.result(timeout=60)
    assert left.finish_reason == "cancelled"
    assert len(left.token_ids) <= 5
    assert staying.result(timeout=60).token_ids == expected


def test_a_failing_sequence_fails_alone(loaded, scheduler):
    class Broken(Sequence):
        def step(self, logits):
            if len(self.result.token_ids) == 2:
                raise RuntimeError("boom")
            return super().step(logits)

    params = SamplingParams(max_tokens=10, temperature=0)
    expected = alone(loaded, PROMPTS[0], params).token_ids
    broken = scheduler.submit(Broken(loaded, ids(loaded, PROMPTS[1]), params, threading.Event(), FOREVER))
    fine = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), params, threading.Event(), FOREVER))
    with pytest.raises(RuntimeError, match="boom"):
        broken.result(timeout=60)
    assert fine.result(timeout=60).token_ids == expected


def test_two_models_batch_separately(loaded, tiny_model, scheduler):
    other = load_model(RECORD, tiny_model, ServingLimits(), runtime_bytes=0)
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = alone(loaded, PROMPTS[0], params).token_ids
    futures = [scheduler.submit(Sequence(m, ids(m, PROMPTS[0]), params, threading.Event(), FOREVER))
               for m in (loaded, other, loaded, other)]
    assert [f.result(timeout=60).token_ids for f in futures] == [expected] * 4
    assert max(scheduler.steps) == 2  # one batch per model


def test_stopping_fails_what_is_still_running(loaded):
    scheduler = BatchScheduler(wait_s=0)
    scheduler.start()
    future = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), SamplingParams(max_tokens=10_000,
                                       temperature=0), threading.Event(), FOREVER))
    time.sleep(0.3)
    scheduler.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        future.result(timeout=30)
    late = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), SamplingParams(max_tokens=1), threading.Event(),
                                     FOREVER))
    with pytest.raises(RuntimeError, match="stopped"):
        late.result(timeout=5)


@pytest.mark.parametrize("logprobs", [1, None], ids=["scoring", "echo-only"])
def test_a_long_scoring_prompt_is_prefilled_between_the_decode_steps_of_a_running_stream(loaded, logprobs):
    """A scoring request's prompt (echo + logprobs, what lm-eval sends) once ran whole before the next decode
    step, and a running stream went silent for as long; now a running stream gets a token per chunk. An echo
    without logprobs (no forward pass at all) once read its whole text in one step too."""
    scheduler = BatchScheduler(prefill_chunk=16, wait_s=0)
    scheduler.start()
    try:
        text = " ".join(PROMPTS) * 8
        prompt = ids(loaded, text)[:200]
        scoring = SamplingParams(max_tokens=0, temperature=0, logprobs=logprobs, echo=True)
        expected = Sequence(loaded, prompt, scoring, threading.Event(), FOREVER)
        expected.prefill(512)  # the same prompt scored in one piece, alone
        long = Sequence(loaded, prompt, scoring, threading.Event(), FOREVER)
        seen: list[int] = []  # how far the long prompt had got each time the stream produced text
        never_ending = SamplingParams(max_tokens=80, temperature=0, logit_bias={e: -100.0 for e in loaded.eos_ids})
        stream = scheduler.submit(Sequence(loaded, ids(loaded, PROMPTS[0]), never_ending, threading.Event(), FOREVER,
                                           on_delta=lambda _text, _lps: seen.append(long.prefilled)))
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        scored = scheduler.submit(long).result(timeout=60)
        stream.result(timeout=60)
    finally:
        scheduler.stop()
    during = {p for p in seen if 0 < p < len(prompt)}
    assert len(during) >= 5, seen  # 13 chunks: the stream kept producing between them
    assert scored.prompt_text == expected.result.prompt_text and scored.prompt_text
    if logprobs is None:
        assert scored.prompt_logprobs == []
        return
    assert [t.token_id for t in scored.prompt_logprobs] == prompt
    assert [t.logprob for t in scored.prompt_logprobs[1:]] == pytest.approx(
        [t.logprob for t in expected.result.prompt_logprobs[1:]], abs=1e-4)


@pytest.mark.parametrize("budgeted", [True, False])
def test_short_rows_never_hold_a_long_rows_width_beyond_the_budget(loaded, budgeted):
    """One near-window request and seven short ones once formed one 8-row batch, every row padded to the long
    one's width: the caches held several times what admission had charged. The padding is now charged to the
    budget, and rows it cannot pay for decode in a batch of their own (``budgeted=False`` is the old rule, to show
    the measure sees the difference)."""
    kv = loaded.shape.kv_bytes_per_token
    capacity = 2 * kv * 1000  # room for the eight requests' own tokens (charged twice, as admission does)
    charged: list[int] = []  # what admission would hold: the requests' own tokens

    def free(_loaded):
        return capacity - sum(charged) - scheduler.padding_bytes

    rows: list[int] = []
    scheduler = BatchScheduler(prefill_chunk=512, wait_s=0, on_step=rows.append,
                               free=free if budgeted else None)
    scheduler.start()
    never_ending = {e: -100.0 for e in loaded.eos_ids}
    short = SamplingParams(max_tokens=40, temperature=0, logit_bias=never_ending)
    futures = []

    def submit_short():
        sequence = Sequence(loaded, ids(loaded, PROMPTS[3]), short, threading.Event(), FOREVER)
        charged.append(2 * kv * sequence.bound)
        futures.append(scheduler.submit(sequence))

    class Long(Sequence):
        def step(self, logits):
            token = super().step(logits)
            if len(self.result.token_ids) == 5 and token is not None:
                for _ in range(7):
                    submit_short()
            return token

    prompt = (ids(loaded, " ".join(PROMPTS) * 30))[:400]
    long_params = SamplingParams(max_tokens=80, temperature=0, logit_bias=never_ending)
    try:
        long = Long(loaded, prompt, long_params, threading.Event(), FOREVER)
        charged.append(2 * kv * long.bound)
        first = scheduler.submit(long)
        got = [first.result(timeout=60)] + [f.result(timeout=60) for f in futures]
    finally:
        scheduler.stop()
    assert [len(g.token_ids) for g in got] == [80] + [40] * 7
    expected = alone(loaded, PROMPTS[3], short).token_ids
    assert all(g.token_ids == expected for g in got[1:])
    held = scheduler.kv_held_peak_bytes
    if budgeted:
        assert held <= capacity // 2, (held, capacity)  # the caches never held more than their tokens' charge
        assert scheduler.over_charge_peak_bytes <= 0
        assert max(rows) == 7  # the short ones batched together, apart from the long one
    else:
        assert held > capacity // 2 and max(rows) == 8
