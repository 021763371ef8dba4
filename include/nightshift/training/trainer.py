"""Trainer entrypoint: full causal-LM fine-tune with DeepSpeed, one process per rank.

Launched by the ``deepspeed`` launcher, locally (CPU ranks) and in the Kubernetes trainer pod (GPU ranks)
with the same command::

    deepspeed --num_gpus 2 --master_port 29500 --module nightshift.training.trainer --config run.json

Rank 0 logs progress, writes ``metrics.json`` and saves the Hugging Face checkpoint to ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.training.recipe import TrainingRecipe

log = logging.getLogger("nightshift.trainer")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class TrainerConfig:
    """Everything one training run needs; written as JSON next to the run's outputs."""

    base_model: str
    """Folder of the Hugging Face checkpoint to start from."""
    train_path: str
    """Packed training blocks (int32 .npy, rows of seq_len tokens)."""
    output_dir: str
    """Where rank 0 writes checkpoint/ and metrics.json."""
    recipe: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> TrainerConfig:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        return path


def _init_distributed() -> tuple[int, int]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def train(config: TrainerConfig) -> dict[str, Any]:
    """Run the fine-tune; return the metrics rank 0 writes."""
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    rank, world = _init_distributed()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    recipe = TrainingRecipe(**config.recipe)
    torch.manual_seed(recipe.seed)
    blocks = np.load(config.train_path, mmap_mode="r")
    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32)
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=recipe.deepspeed_config(),
    )
    per_step = recipe.micro_batch_size * recipe.gradient_accumulation_steps * world
    if rank == 0:
        log.info(
            "fine-tuning %s: %d steps x %d blocks x %d tokens on %d ranks (%s), %d training blocks",
            config.base_model, recipe.train_steps, per_step, blocks.shape[1], world,
            engine.device, blocks.shape[0],
        )
    rng = np.random.default_rng(recipe.seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.monotonic()
    diverged = False
    for step in range(1, recipe.train_steps + 1):
        step_loss = 0.0
        for _ in range(recipe.gradient_accumulation_steps):
            while len(order) < recipe.micro_batch_size * world:
                order.extend(rng.permutation(blocks.shape[0]).tolist())
            take, order = order[: recipe.micro_batch_size * world], order[recipe.micro_batch_size * world :]
            mine = take[rank::world]
            batch = torch.as_tensor(np.stack([blocks[i] for i in mine]).astype(np.int64), device=engine.device)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float().item() / recipe.gradient_accumulation_steps
        mean = torch.tensor([step_loss])
        dist.all_reduce(mean)
        step_loss = mean.item() / world
        losses.append(step_loss)
        if rank == 0 and (step == 1 or step % max(1, recipe.train_steps // 20) == 0 or step == recipe.train_steps):
            elapsed = time.monotonic() - started
            tokens_per_s = step * per_step * blocks.shape[1] / max(elapsed, 1e-9)
            eta = elapsed / step * (recipe.train_steps - step)
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s eta %.0fs",
                step, recipe.train_steps, step_loss, engine.get_lr()[0], tokens_per_s, eta,
            )
        if not math.isfinite(step_loss):
            diverged = True
            if rank == 0:
                log.error("loss is %s at step %d: training diverged, stopping early", step_loss, step)
            break
    seconds = time.monotonic() - started
    metrics = {
        "steps": len(losses),
        "losses": losses,
        "final_loss": losses[-1],
        "diverged": diverged,
        "world_size": world,
        "tokens": len(losses) * per_step * blocks.shape[1],
        "seconds": seconds,
    }
    if rank == 0:
        out = Path(config.output_dir)
        checkpoint = out / "checkpoint"
        engine.module.save_pretrained(checkpoint, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(config.base_model) / name).is_file():
                shutil.copy2(Path(config.base_model) / name, checkpoint / name)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("saved checkpoint to %s after %.1fs (final loss %.4f)", checkpoint, seconds, losses[-1])
    dist.barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="TrainerConfig JSON")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout,
        format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(name)s %(levelname)s %(message)s",
    )
    train(TrainerConfig.read(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
