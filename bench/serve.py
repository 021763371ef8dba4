"""Tokens per second through the endpoint at concurrency 1 and 8, against plain ``model.generate`` on the checkpoint.

    .venv/bin/python bench/serve.py [--tokens 64] [--requests 16]

The bundled SmolLM2-135M is registered as champion in a temporary home and served by ``nightshift serve`` (a
process of its own, as in production, API keys off); the OpenAI client sends greedy requests that all
generate exactly ``--tokens`` tokens (end-of-sequence suppressed by ``logit_bias``, ``min_new_tokens`` for
``generate``). Baselines, measured in the same run on the same checkpoint in this process:

- plain generate, sequential: ``model.generate`` one prompt at a time;
- plain generate, batched 8: eight left-padded prompts per call, the ceiling batching can reach.

Goals: endpoint at c=1 >= 0.9x plain sequential (overhead under 10%); endpoint at c=8 >= 3x endpoint at c=1.

Then the longest gap between the chunks of a running stream while a 4,000-token scoring request (echo +
logprobs, what lm-eval sends) arrives, against the stream's median gap and the scoring request's own time:
prompts are prefilled one chunk per step between decode steps, so the stream stalls for about one chunk's
forward pass, not for the whole prompt. Goal: longest gap under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Write one sentence about the tide tables of a small harbour.",
    "Explain what a lighthouse keeper records every night.",
    "Describe the weather on a foggy morning at sea.",
    "List three things a sailor checks before leaving port.",
    "What does a ship's log contain?",
    "Summarise why harbours publish opening hours.",
    "Give a short greeting to visitors of an observatory.",
    "Tell a two-line story about a night ferry.",
]


def plain(folder: Path, tokens: int, rounds: int) -> tuple[float, float]:
    """Return tokens/s of plain generate: sequential, and batched 8 (left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    with torch.inference_mode():
        model.generate(**tokenizer(chats[:1], return_tensors="pt", add_special_tokens=False), **kwargs)  # warm-up
        started = time.perf_counter()
        generated = 0
        for i in range(rounds):
            batch = tokenizer(chats[i % len(chats) : i % len(chats) + 1], return_tensors="pt", add_special_tokens=False)
            out = model.generate(**batch, **kwargs)
            generated += out.shape[1] - batch["input_ids"].shape[1]
        sequential = generated / (time.perf_counter() - started)
        started = time.perf_counter()
        generated = 0
        for _ in range(max(1, rounds // 8)):
            batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, **kwargs)
            generated += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        batched = generated / (time.perf_counter() - started)
    return sequential, batched


def endpoint(url: str, tokens: int, requests: int, concurrency: int, eos: list[int]) -> tuple[float, int]:
    """Return tokens/s through the endpoint and the number of failed requests."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    failures = 0

    def one(i: int) -> int:
        nonlocal failures
        try:
            r = client.chat.completions.create(
                model="nightshift-llm", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=tokens, temperature=0, logit_bias={str(t): -100 for t in eos})
            return r.usage.completion_tokens
        except Exception as exc:
            print(f"  request failed: {type(exc).__name__}: {exc}")
            failures += 1
            return 0

    one(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(one, range(requests)))
    return generated / (time.perf_counter() - started), failures


def gap_during_scoring(url: str, prompt_tokens: int, eos: list[int]) -> tuple[float, float, float, int]:
    """Return (longest chunk gap while the scoring request ran, median gap before it, the scoring request's
    seconds, its prompt tokens) for one stream and one scoring request."""
    import statistics
    import threading

    import httpx

    window = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    prompt_tokens = min(prompt_tokens, window - 1)
    arrivals: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "nightshift-llm", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400,
                "temperature": 0, "stream": True, "logit_bias": {str(t): -100 for t in eos}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 20:
                        started.set()
        started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    started.wait()
    sent = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": "nightshift-llm", "prompt": [100 + i % 30000 for i in range(prompt_tokens)], "max_tokens": 0,
        "echo": True, "logprobs": 1})
    done = time.perf_counter()
    r.raise_for_status()
    thread.join()
    before = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b <= sent]
    during = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > sent and a < done]
    if not during:
        raise RuntimeError("the stream ended before the scoring request; raise its max_tokens")
    return max(during), statistics.median(before), done - sent, prompt_tokens


@contextlib.contextmanager
def serve(home: Path):
    """``nightshift serve`` as its own process on a free loopback port; yield its URL once it is ready."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (home / "serve.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "nightshift.cli", "serve", "--port", str(port)],
                               env={**os.environ, "NIGHTSHIFT_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the endpoint did not start; see {home / 'serve.log'}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ns-bench-serve-"))
    try:
        return measure(home, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)  # an imported and a registered copy of SmolLM2: 1.6 GB


def measure(home: Path, args) -> int:
    """Run the measurements with state under home; return the exit status (0: goals met)."""
    os.environ["NIGHTSHIFT_HOME"] = str(home)
    os.environ["NIGHTSHIFT_SERVE_REQUIRE_KEY"] = "false"
    from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings
    from nightshift.stores import registry_for
    from nightshift.training.foundation import import_foundation_model

    settings = load_settings()
    folder = import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    registry = registry_for(settings)
    run_id = registry.open_run("bench", "bench", "bench", {})
    registry.upload_checkpoint(run_id, folder)
    registry.promote(registry.register(run_id, tags={}))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eos = sorted({tokenizer.eos_token_id} | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set()))

    print(f"SmolLM2-135M, greedy, {args.tokens} tokens per request, {args.requests} requests per measurement")
    sequential, batched = plain(folder, args.tokens, args.requests)
    print(f"plain generate, sequential   {sequential:8.1f} tokens/s")
    print(f"plain generate, batched 8    {batched:8.1f} tokens/s")
    with serve(home) as url:
        c1, failed1 = endpoint(url, args.tokens, args.requests, 1, eos)
        print(f"endpoint, concurrency 1      {c1:8.1f} tokens/s  ({failed1} failed)")
        c8, failed8 = endpoint(url, args.tokens, args.requests, 8, eos)
        print(f"endpoint, concurrency 8      {c8:8.1f} tokens/s  ({failed8} failed)")
        gap, median, scoring_s, prompt_tokens = gap_during_scoring(url, 4000, eos)
    overhead = c1 / sequential
    scaling = c8 / c1
    print(f"\nc=1 / plain sequential: {overhead:.2f}x (goal >= 0.90)")
    print(f"c=8 / c=1:              {scaling:.2f}x (goal >= 3.00)")
    print(f"c=8 / plain batched 8:  {c8 / batched:.2f}x (the ceiling)")
    print(f"longest chunk gap of a stream while a {prompt_tokens}-token scoring request ran: {gap:.2f} s "
          f"(goal < 2 s); {gap / median:.1f}x its median gap of {median:.3f} s, {gap / scoring_s:.2f}x the scoring "
          f"request's {scoring_s:.1f} s")
    ok = overhead >= 0.9 and scaling >= 3.0 and not (failed1 or failed8) and gap < 2.0
    print("goals met" if ok else "goals NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
