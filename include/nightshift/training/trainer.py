"""Trainer entrypoint: causal-LM fine-tune (full or LoRA) with DeepSpeed ZeRO 1-3, one process per rank.

Launched by ``torchrun``, locally (CPU ranks) and in Kubernetes pods (GPU ranks) with the same command::

    torchrun --nproc-per-node 2 --master-port 29500 --module nightshift.training.trainer --config run.json

Every ``checkpoint_interval`` steps the ranks save a resumable checkpoint (nightshift.training.checkpoints);
a restarted run resumes from the newest complete one that verifies, with the same data order and random
state, and so ends with the same losses. At the end the ranks compute the loss of a fixed batch, rank 0
writes the final weights as a Hugging Face checkpoint (LoRA adapters merged in), ``metrics.json`` with the
per-step history and that reference loss, which the reload check (nightshift.training.verify) must
reproduce in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nightshift.faults import fault_point
from nightshift.training import checkpoints
from nightshift.training.collectives import local_world_size, route_through_shared_memory
from nightshift.training.launch import start_stamp, usable_cores
from nightshift.training.progress import ProgressReporter
from nightshift.training.recipe import TrainingRecipe

log = logging.getLogger("nightshift.trainer")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SUPERVISOR_ENV = "NIGHTSHIFT_SUPERVISOR"
SHM_COLLECTIVES_ENV = "NIGHTSHIFT_CPU_SHM_COLLECTIVES"  # 0: leave CPU collectives to gloo (bench baseline)
REFERENCE_BLOCKS = 4


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
    checkpoint_dir: str = ""
    """Where resumable checkpoints go (the shared state volume on Kubernetes); empty: output_dir/../checkpoints."""
    tracking: dict[str, str] = field(default_factory=dict)
    """MLflow tracking URI and run id that per-step metrics go to; empty: none."""

    @classmethod
    def read(cls, path: Path) -> TrainerConfig:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir).parent / "checkpoints"

    def digest(self) -> str:
        """Return what a checkpoint must have been written under to be resumed: same data, base and recipe."""
        stat = Path(self.train_path).stat()
        raw = json.dumps({"base": self.base_model, "train": [self.train_path, stat.st_size], "recipe": self.recipe},
                         sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


class BatchOrder:
    """Which blocks each micro-batch takes: a seeded permutation per epoch, a pure function of the position.

    A resumed run needs only the step it resumes after to continue with the very same blocks.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def blocks(self, start: int, count: int) -> list[int]:
        import numpy as np

        out = []
        for i in range(start, start + count):
            epoch, pos = divmod(i, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self._perm[pos]))
        return out


def deepspeed_env(env: dict[str, str]) -> dict[str, str]:
    """Return the variables DeepSpeed's own launcher would have set, derived from torchrun's.

    DeepSpeed reads ``LOCAL_SIZE`` to count CPU "devices" and to size its shared-memory all-reduce (which
    crashes without it), and ``CROSS_RANK``/``CROSS_SIZE`` for the node.
    """
    local = env.get("LOCAL_WORLD_SIZE", "")
    out = {}
    if local.isdigit() and "LOCAL_SIZE" not in env:
        out["LOCAL_SIZE"] = local
    if env.get("GROUP_RANK", "").isdigit() and "CROSS_RANK" not in env:
        out["CROSS_RANK"] = env["GROUP_RANK"]
    if local.isdigit() and env.get("WORLD_SIZE", "").isdigit() and "CROSS_SIZE" not in env:
        out["CROSS_SIZE"] = str(max(1, int(env["WORLD_SIZE"]) // max(1, int(local))))
    return out


def _init_distributed() -> tuple[int, int]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def release_shared_memory(rank: int) -> None:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce segment once every local rank has mapped it.

    DeepSpeed's shared-memory all-reduce (CPU ranks on one machine) creates a 67 MB segment per rank in
    /dev/shm and never unlinks it: every run, finished or killed, would leave RAM-backed files behind until
    the machine runs out of memory. The mappings stay valid after the unlink; the memory is freed when the
    ranks exit, however they exit.
    """
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    try:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    except OSError:
        pass


def watch_supervisor() -> None:
    """Exit when the task that launched the ranks is gone (killed with SIGKILL), or the launcher itself is.

    ``NIGHTSHIFT_SUPERVISOR`` is ``<pid>:<start time>``; a recycled pid does not fool the check. The
    launcher (torchrun) puts each rank in a session of its own, so a signal to the task's process group
    does not reach the ranks: they watch their parent too, and stop when they are handed to another.
    """
    value = os.environ.get(SUPERVISOR_ENV)
    parent = os.getppid()
    pid_text, _, started = (value or "").partition(":")

    def task_alive() -> bool:
        return not value or (pid_text.isdigit() and start_stamp(int(pid_text)) == started)

    def loop() -> None:
        while True:
            if not task_alive():
                gone = f"the task that launched it (pid {pid_text})"
            elif os.getppid() != parent:
                gone = f"its launcher (pid {parent})"
            else:
                time.sleep(1.0)
                continue
            logging.getLogger("nightshift.trainer").error("%s is gone; this rank stops", gone)
            release_shared_memory(int(os.environ.get("RANK", "0")))  # in case it stops before the ranks could
            os._exit(75)

    threading.Thread(target=loop, name="supervisor-watch", daemon=True).start()


def build_model(base_model: str, recipe: TrainingRecipe, dtype=None):
    """Return the model to train: the base checkpoint, wrapped with LoRA adapters when the recipe says so."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype or torch.float32)
    model.config.use_cache = False
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = recipe.lora
        assert lora is not None
        model = get_peft_model(model, LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
        ))
    return model


def export_checkpoint(engine, recipe: TrainingRecipe, config: TrainerConfig, rank: int, dest: Path,
                      stage: int) -> None:
    """Write the trained weights as a plain Hugging Face checkpoint (fp32; LoRA merged) to ``dest``.

    Every rank must call this: under ZeRO-3 the parameters are gathered from all of them. Rank 0 writes
    ``dest`` under a temporary name and renames it when complete.
    """
    import torch

    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers every shard onto rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    state = {k: v.detach().to(torch.float32) for k, v in state.items()}
    model = build_model(config.base_model, TrainingRecipe(**{**recipe.to_dict(), "gradient_checkpointing": False}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"trained weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if recipe.method == "lora":
        model = model.merge_and_unload()
    model.config.use_cache = True
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(config.base_model) / name).is_file():
            shutil.copy2(Path(config.base_model) / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def train(config: TrainerConfig) -> dict[str, Any]:
    """Run the fine-tune; return the metrics rank 0 writes."""
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    rank, world = _init_distributed()
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu:
        dist.barrier()  # every rank has mapped every other rank's segment by now
        release_shared_memory(rank)
        if os.environ.get(SHM_COLLECTIVES_ENV, "1") != "0" and route_through_shared_memory() and rank == 0:
            log.info("CPU ranks on one machine: all-reduce and all-gather through shared memory")
    local_world = local_world_size() or world
    if on_cpu:  # the cores are shared out between the ranks on this machine: all of them for a single rank
        torch.set_num_threads(max(1, usable_cores() // local_world))
    recipe = TrainingRecipe(**config.recipe)
    bf16_ok = not on_cpu and accelerator.is_bf16_supported()
    precision = recipe.resolved_precision(bf16_ok)
    stage = recipe.effective_zero_stage(world)
    torch.manual_seed(recipe.seed)
    blocks = np.load(config.train_path, mmap_mode="r")
    model = build_model(config.base_model, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=recipe.deepspeed_config(world, bf16_ok))
    if stage == 0 and precision == "fp32":
        # Without ZeRO, DeepSpeed clips fp32 gradients but keeps no norm to report: clip with torch's (one
        # fused pass) and keep the norm where get_global_grad_norm() reads it.
        def clip_and_keep_norm() -> None:
            engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.max_grad_norm)

        engine.clip_fp32_gradients = clip_and_keep_norm
    # One rank has no gradients to average: skip DeepSpeed's all-reduce, which would still copy every
    # gradient into a flat buffer and back (8% of a SmolLM2 step on CPU).
    no_reduction = engine.no_sync if world == 1 and stage == 0 else contextlib.nullcontext
    per_rank = recipe.micro_batch_size
    per_micro = per_rank * world
    per_step_blocks = per_micro * recipe.gradient_accumulation_steps
    tokens_per_step = per_step_blocks * blocks.shape[1]
    order = BatchOrder(blocks.shape[0], recipe.seed)
    digest = config.digest()
    root = config.checkpoints

    start_step, history = 0, []
    if recipe.checkpoint_interval:
        start_step, history = resume(engine, root, digest, rank, world)
    if rank == 0:
        log.info(
            "fine-tuning %s (%s, %s, %s%s): %d steps x %d blocks x %d tokens on %d rank%s (%s%s), "
            "%d trainable of %d parameters, %d training blocks%s",
            Path(config.base_model).name, recipe.method,
            f"ZeRO-{stage}" if stage else f"ZeRO off: one rank, nothing to shard (recipe: ZeRO-{recipe.zero_stage})",
            precision, ", gradient checkpointing" if recipe.gradient_checkpointing else "", recipe.train_steps,
            per_step_blocks, blocks.shape[1], world, "" if world == 1 else "s", engine.device,
            f", {torch.get_num_threads()} threads each" if on_cpu else "", sum(p.numel() for p in trainable),
            sum(p.numel() for p in model.parameters()), blocks.shape[0],
            f"; resumed after step {start_step}" if start_step else "",
        )
    reporter = ProgressReporter(recipe.train_steps, tokens_per_step, config.tracking if rank == 0 else None,
                                first_step=start_step + 1, enabled=rank == 0)
    started, started_at = time.monotonic(), time.time()
    diverged = False
    engine.train()
    for step in range(start_step + 1, recipe.train_steps + 1):
        step_loss = 0.0
        for micro in range(recipe.gradient_accumulation_steps):
            position = ((step - 1) * recipe.gradient_accumulation_steps + micro) * per_micro
            mine = order.blocks(position, per_micro)[rank::world]
            batch = torch.as_tensor(np.stack([blocks[i] for i in mine]).astype(np.int64), device=engine.device)
            loss = engine(input_ids=batch, labels=batch).loss
            with no_reduction():
                engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float().item() / recipe.gradient_accumulation_steps
        if world > 1:
            mean = torch.tensor([step_loss], device=engine.device)
            dist.all_reduce(mean)
            step_loss = mean.item() / world
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        entry = reporter.step(step, step_loss, float(engine.get_lr()[0]), norm)
        history.append({k: entry[k] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s")})
        fault_point(f"trainer.rank{rank}.step{step}")
        if not math.isfinite(step_loss):
            diverged = True
            if rank == 0:
                log.error("loss is %s at step %d: training diverged, stopping early", step_loss, step)
            break
        if recipe.checkpoint_interval and step % recipe.checkpoint_interval == 0 and step < recipe.train_steps:
            save(engine, root, step, history, digest, recipe.keep_checkpoints, rank, world)
            reporter.flush(wait=True)  # the tracked curve covers at least what a resumed run will not redo
            fault_point(f"trainer.rank{rank}.checkpoint{step}")
    reporter.flush(wait=True)
    seconds = time.monotonic() - started
    reference = reference_loss(engine, blocks, min(REFERENCE_BLOCKS, blocks.shape[0]))
    losses = [h["loss"] for h in history]
    metrics = {
        "steps": len(losses),
        "losses": losses,
        "history": history,
        "final_loss": losses[-1],
        "diverged": diverged,
        "world_size": world,
        "resumed_from": start_step,
        "tokens": len(losses) * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "seconds": seconds,
        "started_at": started_at,
        "method": recipe.method,
        "zero_stage": stage,
        "tracked": reporter.client is not None,
        "precision": precision,
        "reload_check": {"blocks": list(range(min(REFERENCE_BLOCKS, blocks.shape[0]))), "loss": reference,
                         "tolerance": recipe.reload_tolerance_for(precision), "data": config.train_path},
    }
    out = Path(config.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    export_checkpoint(engine, recipe, config, rank, out / "checkpoint", stage)
    if rank == 0:
        tmp = out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out / "metrics.json")
        log.info("saved checkpoint to %s after %.1fs of training (final loss %.4f, reference loss %.6f)",
                 out / "checkpoint", seconds, losses[-1], reference)
    dist.barrier()
    return metrics


def reference_loss(engine, blocks, count: int) -> float:
    """Return the trained model's loss on the first ``count`` blocks, without dropout; all ranks take part."""
    import numpy as np
    import torch

    engine.eval()
    batch = torch.as_tensor(np.asarray(blocks[:count]).astype(np.int64), device=engine.device)
    with torch.no_grad():
        loss = engine(input_ids=batch, labels=batch).loss.float().item()
    engine.train()
    return loss


def save(engine, root: Path, step: int, history: list[dict[str, Any]], digest: str, keep: int, rank: int,
         world: int) -> None:
    """Save a resumable checkpoint on every rank, then publish it with a manifest and prune old ones."""
    import torch
    import torch.distributed as dist

    tag = checkpoints.tag_for(step)
    folder = root / tag
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / "rng" / f"rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    mine = checkpoints.hash_share(folder, rank, world)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        checkpoints.write_manifest(folder, files, {"step": step, "world_size": world, "config": digest,
                                                   "history": history})
        removed = checkpoints.prune(root, keep)
        log.info("checkpoint %s saved (%d files, %.0f MB)%s", tag, len(files),
                 sum(v["size"] for v in files.values()) / 1e6, f"; removed {', '.join(removed)}" if removed else "")
    dist.barrier()


def resume(engine, root: Path, digest: str, rank: int, world: int) -> tuple[int, list[dict[str, Any]]]:
    """Load the newest complete checkpoint that verifies; return the step it was taken after and the history."""
    import torch
    import torch.distributed as dist

    for candidate in checkpoints.complete(root):
        meta = candidate.manifest
        if meta.get("config") != digest:
            problem: str | None = "it was written for other data, base model or recipe"
        elif meta.get("world_size") != world:
            problem = f"it was written by {meta.get('world_size')} ranks, this run has {world}"
        else:
            problem = checkpoints.verify_share(candidate, rank, world)
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, problem)
        found = next((p for p in problems if p), None)
        if found:
            if rank == 0:
                log.warning("skipping checkpoint %s: %s", candidate.tag, found)
            continue
        engine.load_checkpoint(str(root), tag=candidate.tag, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        state = torch.load(candidate.path / "rng" / f"rank{rank}.pt", weights_only=True)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if rank == 0:
            log.info("resuming from checkpoint %s", candidate.tag)
        return candidate.step, list(meta.get("history", []))
    return 0, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="TrainerConfig JSON")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout,
        format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(name)s %(levelname)s %(message)s",
    )
    watch_supervisor()  # first: a launcher that dies during start-up must not leave a rank waiting at rendezvous
    os.environ.update(deepspeed_env(dict(os.environ)))
    train(TrainerConfig.read(args.config))
    # Everything is written and every rank is past the last barrier. Python's final garbage collection over
    # torch's, transformers' and DeepSpeed's objects would take another second of every run; skip it.
    gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
