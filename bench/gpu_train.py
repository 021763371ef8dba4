"""The Python half of bench/gpu_train.sh: build the ~1B model, run ZeRO-2 and ZeRO-3 bf16, report tokens/s and MFU.

On a single GPU the trainer runs without ZeRO whatever the recipe's stage (nothing to shard); the lines say so.

Random-init weights and random tokens (nothing is downloaded): throughput does not depend on what is learned.
Each stage runs ``--steps`` optimizer steps through the real launcher and trainer; the median tokens/s of the
steps after the first three (warm-up, allocator growth) is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Dense bf16 peak of common training GPUs (no sparsity), TFLOP/s; GPU_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
BIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=49152)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)


def gpu_info() -> tuple[str, int, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", 1, None
    name = torch.cuda.get_device_name(0)
    peak = float(os.environ["GPU_PEAK_TFLOPS"]) if os.environ.get("GPU_PEAK_TFLOPS") else next(
        (v for k, v in PEAK_TFLOPS.items() if k in name.upper().replace("NVIDIA ", "")), None)
    return name, torch.cuda.device_count(), peak


def build_model(dest: Path, dims: dict, seq_len: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=max(seq_len, 4096), tie_word_embeddings=True,
                                  bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def run_stage(stage: int, model: Path, data: Path, work: Path, gpus: int, args) -> dict:
    from nightshift.training.launch import launch_command, local_env, run_local
    from nightshift.training.recipe import TrainingRecipe
    from nightshift.training.trainer import TrainerConfig

    recipe = TrainingRecipe.load("gpu-zero3-1b", zero_stage=stage, train_steps=args.steps,
                                 micro_batch_size=args.micro_batch, gradient_accumulation_steps=1,
                                 seq_len=args.seq_len, gradient_checkpointing=args.checkpointing,
                                 checkpoint_interval=0, warmup_steps=1,
                                 precision="fp32" if args.smoke else "bf16")
    out = work / f"zero{stage}"
    config = TrainerConfig(base_model=str(model), train_path=str(data), output_dir=str(out / "candidate"),
                           recipe=recipe.to_dict(), checkpoint_dir=str(out / "checkpoints"))
    path = config.write(out / "trainer.json")
    t0 = time.time()
    run_local(launch_command(path, gpus, 29500 + stage), local_env(), out / "trainer.log")
    metrics = json.loads((out / "candidate" / "metrics.json").read_text())
    rates = [h["tokens_per_s"] for h in metrics["history"]][3:] or [metrics["history"][-1]["tokens_per_s"]]
    return {"tokens_per_s": statistics.median(rates), "startup_s": metrics["started_at"] - t0,
            "wall_s": time.time() - t0, "final_loss": metrics["final_loss"], "zero_stage": metrics["zero_stage"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true", help="recompute activations (less memory)")
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args()
    args.smoke = bool(os.environ.get("GPU_BENCH_SMOKE"))
    if args.smoke:
        args.seq_len, args.micro_batch, args.steps = 64, 2, min(args.steps, 5)
    import numpy as np

    name, gpus, peak = gpu_info()
    if name == "cpu" and not args.smoke:
        print("no CUDA GPU found: this benchmark needs one (GPU_BENCH_SMOKE=1 checks the script on CPU)")
        return 2
    dims = SMOKE if args.smoke else BIG
    work = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    params = build_model(work / "model", dims, args.seq_len)
    rows = max(256, args.micro_batch * gpus * (args.steps + 2))
    np.save(work / "train.npy", np.random.default_rng(0).integers(3, dims["vocab_size"], size=(
        rows, args.seq_len)).astype(np.int32))
    layers, hidden = dims["num_hidden_layers"], dims["hidden_size"]
    flops_per_token = 6 * params + 12 * layers * hidden * args.seq_len
    print(f"{name} x{gpus}: {params / 1e9:.2f}B parameters, {args.seq_len}-token blocks, micro-batch "
          f"{args.micro_batch} per GPU, {args.steps} steps, {'fp32 (smoke)' if args.smoke else 'bf16'}, "
          f"{flops_per_token / 1e9:.1f} GFLOP per token"
          + (f", peak {peak:.0f} TFLOP/s per GPU" if peak else ", peak unknown (set GPU_PEAK_TFLOPS)"))
    for stage in (int(s) for s in args.stages.split(",")):
        result = run_stage(stage, work / "model", work / "train.npy", work, gpus, args)
        per_gpu = result["tokens_per_s"] / gpus
        mfu = per_gpu * flops_per_token / (peak * 1e12) if peak else float("nan")
        used = f"ZeRO-{stage}" if result["zero_stage"] == stage else f"recipe ZeRO-{stage}, run without ZeRO (one GPU)"
        print(f"{used}: {per_gpu:,.0f} tokens/s per GPU, MFU {mfu:.1%} (goal >= 45%), start-up "
              f"{result['startup_s']:.0f} s, run {result['wall_s']:.0f} s, final loss {result['final_loss']:.3f}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
