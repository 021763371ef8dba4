"""Tokens/s of the nightshift trainer against a plain PyTorch/transformers training loop, on this machine's CPU.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--recipe default] [--compare-ranks 2]

Both train SmolLM2-135M (the bundled foundation model) on the same packed blocks, with the same sequence
length and the same tokens per optimizer step (micro-batch x ranks x accumulation of the recipe), AdamW and
gradient clipping:

- nightshift: ``torchrun`` with the ranks the DAG would pick for the recipe (``ranks: auto``: one process
  using every core on a machine without GPUs), the recipe as the DAG runs it (precision, no checkpoints
  during the measured steps); then once more with ``--compare-ranks`` CPU ranks on the same cores, to show
  what sharding the work between processes costs here;
- plain: one Python process, ``torch.set_num_threads(<all cores>)``, ``AutoModelForCausalLM`` and
  ``torch.optim.AdamW`` in a textbook loop; and the same loop given the trainer's two free advantages (fused
  AdamW, glibc keeping freed memory), which leaves the trainer's own overhead to compare.

Throughput is the median tokens/s of the steps after the first two (warm-up); the plain loop runs before and
after the trainer and its two medians are averaged, so load on this shared machine shifts both sides alike.
Start-up (launcher, imports, rendezvous, model load, DeepSpeed set-up: launch to first step) is reported
apart, once cold (first run of the session may JIT-build DeepSpeed's CPU ops) and once warm.
Goals: ratio >= 1.0x; warm start-up < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
model_dir, data, steps, per_step, lr, clip, threads, fused = sys.argv[1:9]
torch.set_num_threads(int(threads)); torch.manual_seed(0)
blocks = np.load(data)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32); model.config.use_cache = False
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=float(lr), fused=fused == "1")
rates = []
for step in range(int(steps)):
    t = time.perf_counter()
    idx = [(step * int(per_step) + i) % len(blocks) for i in range(int(per_step))]
    batch = torch.as_tensor(blocks[idx].astype(np.int64))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
    opt.step(); opt.zero_grad(set_to_none=True)
    rates.append(batch.numel() / (time.perf_counter() - t))
print(json.dumps({"tokens_per_s": rates, "loss": loss.item()}))
"""


def median_after_warmup(rates: list[float]) -> float:
    return statistics.median(rates[2:] if len(rates) > 3 else rates)


def plain_loop(model: Path, data: Path, steps: int, per_step: int, lr: float, clip: float,
               tuned: bool = False) -> float:
    """Median tokens/s of the textbook loop; ``tuned``: with the trainer's two free advantages too (torch's fused
    AdamW, and glibc keeping freed memory), so that what is left is the trainer's own overhead."""
    env = dict(os.environ)
    if tuned:
        env.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)})
    out = subprocess.run([sys.executable, "-c", PLAIN, str(model), str(data), str(steps), str(per_step), str(lr),
                          str(clip), str(os.cpu_count() or 1), "1" if tuned else "0"], capture_output=True, text=True,
                         check=True, env=env)
    return median_after_warmup(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])


def nightshift_trainer(model: Path, data: Path, recipe, ranks: int, work: Path,
                       env_extra: dict | None = None) -> tuple[float, float, dict]:
    from nightshift.training.launch import free_port, launch_command, local_env, run_local
    from nightshift.training.trainer import TrainerConfig

    config = TrainerConfig(base_model=str(model), train_path=str(data), output_dir=str(work / "candidate"),
                           recipe=recipe.to_dict(), checkpoint_dir=str(work / "checkpoints"))
    path = config.write(work / "trainer.json")
    launched = time.time()
    run_local(launch_command(path, ranks, free_port()), {**local_env(), **(env_extra or {})}, work / "trainer.log")
    metrics = json.loads((work / "candidate" / "metrics.json").read_text())
    rates = [h["tokens_per_s"] for h in metrics["history"]]
    return median_after_warmup(rates), metrics["started_at"] - launched, metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--compare-ranks", type=int, default=2, help="also train with this many CPU ranks (0: no)")
    args = parser.parse_args()

    import numpy as np

    from nightshift.settings import DEFAULT_FOUNDATION_MODEL, load_settings
    from nightshift.training.foundation import import_foundation_model
    from nightshift.training.launch import resolve_ranks, usable_cores
    from nightshift.training.recipe import TrainingRecipe

    settings = load_settings()
    model = import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    recipe = TrainingRecipe.load(args.recipe, settings.recipe_dirs, train_steps=args.steps)
    recipe = TrainingRecipe(**{**recipe.to_dict(), "checkpoint_interval": 0})
    ranks = resolve_ranks(recipe.ranks, "local", settings.train_ranks, settings.kubernetes.gpus)
    per_step = recipe.micro_batch_size * ranks * recipe.gradient_accumulation_steps
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = work / "train.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.integers(3, 49000, size=(max(64, per_step * 8), recipe.seq_len)).astype(np.int32))
    cores = usable_cores()
    print(f"SmolLM2-135M, recipe {args.recipe}: {per_step} blocks x {recipe.seq_len} tokens per step, "
          f"{args.steps} steps, {cores} cores, {ranks} rank{'s' if ranks > 1 else ''} (ranks: {recipe.ranks})")

    _, cold_start, _ = nightshift_trainer(model, data, TrainingRecipe(**{**recipe.to_dict(), "train_steps": 1}),
                                          ranks, work / "cold")
    loop = (model, data, args.steps, per_step, recipe.learning_rate, recipe.max_grad_norm)
    plain_before, tuned_before = plain_loop(*loop), plain_loop(*loop, tuned=True)
    ours, warm_start, metrics = nightshift_trainer(model, data, recipe, ranks, work / "warm")
    tuned_after, plain_after = plain_loop(*loop, tuned=True), plain_loop(*loop)
    plain, tuned = (plain_before + plain_after) / 2, (tuned_before + tuned_after) / 2
    print(f"plain loop (1 process, {cores} threads): {plain_before:,.0f} / {plain_after:,.0f} tokens/s "
          f"(before / after)")
    print(f"  same loop with fused AdamW and glibc keeping freed memory: {tuned_before:,.0f} / {tuned_after:,.0f}")
    stage = metrics["zero_stage"]
    print(f"nightshift trainer ({ranks} rank{'s' if ranks > 1 else ''}, "
          f"{f'ZeRO-{stage}' if stage else 'ZeRO off'}, {metrics['precision']}): {ours:,.0f} tokens/s")
    if args.compare_ranks and args.compare_ranks != ranks:
        other, _, other_metrics = nightshift_trainer(model, data, recipe, args.compare_ranks, work / "compare")
        print(f"  same recipe on {args.compare_ranks} CPU ranks (ZeRO-{other_metrics['zero_stage']}, "
              f"{other_metrics['tokens_per_step']} tokens per step): {other:,.0f} tokens/s "
              f"({other / plain:.2f}x the plain loop)")
    print(f"ratio nightshift / plain: {ours / plain:.2f}x (goal >= 1.0x); against the tuned loop: {ours / tuned:.2f}x "
          "(DeepSpeed's engine, progress and tracking)")
    print(f"start-up, launch to first step: cold {cold_start:.1f} s, warm {warm_start:.1f} s (goal warm < 15 s)")
    shutil.rmtree(work, ignore_errors=True)  # three trainer outputs with checkpoints
    return 0


if __name__ == "__main__":
    sys.exit(main())
