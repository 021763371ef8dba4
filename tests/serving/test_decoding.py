"""The decode loop against transformers' own generate(), stop sequences, cancellation, deadlines, seeds, and loading."""

import threading
import time

import pytest

from helpers import local_registry, publish
from nightshift.records import ModelVersionRecord
from nightshift.serving.decoding import Detokenizer, SamplingParams, generate
from nightshift.serving.loading import ModelTooLarge, load_model
from nightshift.serving.watching import ChampionWatcher
from nightshift.settings import ServingLimits

RECORD = ModelVersionRecord(name="nightshift-llm", version=1, run_id="r", source="s", dataset_tag="d", fingerprint="")
FOREVER = float("inf")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(RECORD, tiny_model, ServingLimits(), runtime_bytes=0)


def prompt_of(loaded, text="The observatory opens at"):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def run(loaded, params, prompt=None, chunk=512, cancel=None, deadline=FOREVER, on_delta=None):
    return generate(loaded, prompt or prompt_of(loaded), params, cancel or threading.Event(),
                    time.monotonic() + deadline if deadline != FOREVER else FOREVER, chunk, on_delta)


def test_greedy_decoding_equals_transformers_generate(loaded):
    import torch

    prompt = prompt_of(loaded)
    result = run(loaded, SamplingParams(max_tokens=24, temperature=0))
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=sorted(loaded.eos_ids), pad_token_id=sorted(loaded.eos_ids)[0])
    expected = [t for t in out[0, len(prompt):].tolist() if t not in loaded.eos_ids]
    assert result.token_ids == expected
    assert result.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_prefill_in_chunks_changes_nothing(loaded):
    prompt = prompt_of(loaded, "A longer prompt, so that it spans several prefill chunks of four tokens each.")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, echo=True)
    whole = run(loaded, params, prompt, chunk=512)
    chunked = run(loaded, params, prompt, chunk=4)
    assert chunked.token_ids == whole.token_ids
    assert [t.logprob for t in chunked.prompt_logprobs] == pytest.approx([t.logprob for t in whole.prompt_logprobs],
                                                                       abs=1e-4)


def test_seeded_sampling_is_reproducible_even_when_requests_run_concurrently(loaded):
    params = {seed: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed) for seed in (1, 2, 3, 4)}
    alone = {seed: run(loaded, p).token_ids for seed, p in params.items()}
    together: dict[int, list[int]] = {}

    def worker(seed):
        together[seed] = run(loaded, params[seed]).token_ids

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in params]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len({tuple(v) for v in alone.values()}) > 1  # different seeds, different samples


def test_stop_sequence_ends_generation_and_is_never_streamed(loaded):
    free = run(loaded, SamplingParams(max_tokens=24, temperature=0))
    assert len(free.text) > 6, free.text
    stop = free.text[3:6]
    deltas: list[str] = []
    stopped = run(loaded, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)),
                  on_delta=lambda text, _lps: deltas.append(text))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(deltas) == stopped.text and stop not in "".join(deltas)
    assert len(stopped.token_ids) < len(free.token_ids)


def test_a_cancelled_request_stops_within_one_token(loaded):
    cancel = threading.Event()
    seen: list[str] = []

    def on_delta(text, _lps):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()

    bias = {t: -100.0 for t in loaded.eos_ids}
    result = run(loaded, SamplingParams(max_tokens=400, temperature=0, logit_bias=bias), cancel=cancel,
                 on_delta=on_delta)
    assert result.finish_reason == "cancelled"
    assert len(result.token_ids) <= 5


def test_the_deadline_stops_generation(loaded):
    bias = {t: -100.0 for t in loaded.eos_ids}
    started = time.monotonic()
    result = run(loaded, SamplingParams(max_tokens=100, temperature=0, logit_bias=bias), deadline=0.0)
    assert result.finish_reason == "timeout" and result.token_ids == []
    assert time.monotonic() - started < 5


def test_penalties_and_bias_change_what_is_chosen(loaded):
    plain = run(loaded, SamplingParams(max_tokens=12, temperature=0))
    forced = plain.token_ids[0] + 1
    biased = run(loaded, SamplingParams(max_tokens=12, temperature=0, logit_bias={forced: 100.0}))
    assert set(biased.token_ids) == {forced}
    penalised = run(loaded, SamplingParams(max_tokens=12, temperature=0, logit_bias={forced: 5.0},
                                           frequency_penalty=2.0))
    assert len(set(penalised.token_ids)) > 1


def test_detokenizer_streams_multibyte_text_exactly(loaded):
    text = "Café ☕ and 望远镜 at 22:00 — 👋"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(loaded.tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == loaded.tokenizer.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)


def test_window_is_fitted_to_the_memory_budget_and_a_model_too_big_is_refused(tiny_model):
    roomy = load_model(RECORD, tiny_model, ServingLimits(memory_budget_mb=4096), runtime_bytes=0)
    assert roomy.window == 512  # the model's own window
    capped = load_model(RECORD, tiny_model, ServingLimits(max_model_len=128), runtime_bytes=0)
    assert capped.window == 128
    with pytest.raises(ModelTooLarge, match="NIGHTSHIFT_SERVE_MEMORY_MB"):
        load_model(RECORD, tiny_model, ServingLimits(memory_budget_mb=256), runtime_bytes=250 * 1024 * 1024)


def test_a_champion_that_fails_to_load_leaves_the_previous_one_serving_and_alerts_once(tiny_model, tmp_path):
    registry = local_registry(tmp_path)
    alerts: list[tuple[str, str, str]] = []
    watcher = ChampionWatcher(registry, tmp_path / "cache", ServingLimits(), on_alert=lambda *a: alerts.append(a))
    assert watcher.state == "loading"
    watcher.refresh()
    assert watcher.state == "no_model"

    publish(registry, tiny_model, "good")
    assert watcher.refresh() and watcher.state == "ready" and watcher.current.record.version == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "hidden_size": "oops"}')
    publish(registry, broken, "broken")
    assert not watcher.refresh()
    assert watcher.state == "ready" and watcher.current.record.version == 1
    assert "v2 failed to load" in watcher.detail and "serving nightshift-llm v1" in watcher.detail
    assert len(alerts) == 1 and "v2" in alerts[0][0] and alerts[0][2] == "error"
    assert not watcher.refresh() and len(alerts) == 1  # backing off: no retry, no second alert

    publish(registry, tiny_model, "fixed")
    assert watcher.refresh() and watcher.current.record.version == 3 and watcher.state == "ready"


def test_readiness_is_false_while_loading_or_swapping(tiny_model, tmp_path):
    registry = local_registry(tmp_path)
    publish(registry, tiny_model, "one")
    watcher = ChampionWatcher(registry, tmp_path / "cache", ServingLimits())
    states: list[str] = []
    original = registry.download

    def observing_download(record, cache_dir):
        states.append(watcher.state)
        return original(record, cache_dir)

    registry.download = observing_download
    watcher.refresh()
    publish(registry, tiny_model, "two")
    watcher.refresh()
    assert states == ["loading", "swapping"]
    assert watcher.state == "ready" and watcher.current.record.version == 2


def test_the_app_resolves_every_transformers_name_it_uses_before_any_watcher_thread_starts(tmp_path):
    """Two watcher threads resolving transformers' lazy names at once could raise ImportError and mark a healthy
    champion failed; the names are resolved in the thread that builds the application."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from pathlib import Path\n"
        "from nightshift.registry.mlflow_registry import ModelRegistry\n"
        "from nightshift.serving.app import create_app\n"
        "create_app(ModelRegistry(sys.argv[1], 'm', sys.argv[2]), Path(sys.argv[3]))\n"
        "resolved = vars(sys.modules['transformers'])\n"
        "names = ('AutoConfig', 'AutoModelForCausalLM', 'AutoTokenizer', 'DynamicCache', 'TemperatureLogitsWarper',"
        " 'TopPLogitsWarper')\n"
        "print(sorted(n for n in names if n not in resolved), threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'm.db'}", tmp_path.as_uri(),
                          str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["[]", "1"], out.stdout
