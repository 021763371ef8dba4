"""Fine-tuning recipes: versioned YAML files in include/configs/training/, validated into a dataclass.

A recipe says how to train (full fine-tune or LoRA adapters, the ZeRO stage and offload, precision,
gradient checkpointing and accumulation, the schedule) and how often to checkpoint. Errors name the file
and the field, e.g. ``lora.yaml: lora.rank must be at least 1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.configs import load_yaml_dataclass
from nightshift.settings import CONFIG_DIR, MAX_TRAIN_RANKS

RECIPE_DIR = CONFIG_DIR / "training"
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
METHODS = ("full", "lora")
PRECISIONS = ("fp32", "bf16", "auto")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
BF16_RELOAD_TOLERANCE = 1e-2
MAX_SEED = 2**32 - 1
"""numpy's and torch's seeds are unsigned; a negative seed passes YAML and crashes every rank."""
MAX_STEPS = 1_000_000
MAX_BATCH = 4096
MAX_SEQ_LEN = 1_048_576


def _finite(value: Any) -> bool:
    """Return whether a recipe number is a real number (YAML reads .inf and .nan as floats)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (peft) trained instead of the full weights, merged into them after training."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @classmethod
    def parse(cls, value: Any) -> LoraSettings:
        if isinstance(value, LoraSettings):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"lora must be a mapping of {sorted(f.name for f in dataclasses.fields(cls))}")
        unknown = sorted(str(k) for k in set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"lora: unknown fields {unknown}")
        errors = []
        for name, kind in (("rank", int), ("alpha", (int, float)), ("dropout", (int, float))):
            if name in value and (not isinstance(value[name], kind) or isinstance(value[name], bool)):
                errors.append(f"lora.{name} must be a number")
        modules = value.get("target_modules", cls.target_modules)
        if not isinstance(modules, list | tuple) or not modules or not all(
                isinstance(m, str) and MODULE_NAME.fullmatch(m) for m in modules):
            errors.append("lora.target_modules must be a non-empty list of module names such as q_proj")
        if errors:
            raise ValueError("; ".join(errors))
        return cls(**{**value, "target_modules": tuple(modules)})

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.rank <= 4096, "lora.rank must be an integer from 1 to 4096"),
            (_finite(self.alpha) and self.alpha > 0, "lora.alpha must be a finite positive number"),
            (_finite(self.dropout) and 0 <= self.dropout < 1, "lora.dropout must lie in [0, 1)"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("; ".join(errors))


@dataclass(frozen=True)
class TrainingRecipe:
    """Hyper-parameters of one fine-tune."""

    method: str = "full"
    """full: every weight is trained; lora: low-rank adapters (see ``lora``), merged into the weights after."""
    lora: LoraSettings | None = None
    seq_len: int = 256
    """Tokens per packed training block."""
    micro_batch_size: int = 2
    """Blocks per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    train_steps: int = 20
    """Optimizer steps."""
    learning_rate: float = 5e-5
    """Peak learning rate after warm-up; decays linearly to zero at the last step."""
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ranks: int | str = "auto"
    """Training ranks per node: ``auto`` is one per GPU, or on a machine without GPUs one process using every
    core (NIGHTSHIFT_TRAIN_RANKS sets the number for ``auto``); a number fixes it, and with it the global batch."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also the parameters. One rank has
    nothing to shard: without offload it trains with ZeRO off (its bookkeeping costs a third of the step on CPU)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 1-3; needs DeepSpeed's CPU Adam, built on first use)."""
    offload_param: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""
    precision: str = "fp32"
    """fp32, bf16, or auto: bf16 where the accelerator has it (GPUs since Ampere), fp32 elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    checkpoint_interval: int = 0
    """Save a resumable DeepSpeed checkpoint every N optimizer steps (0: never; a retry starts over)."""
    keep_checkpoints: int = 2
    """How many of the newest complete checkpoints to keep."""
    reload_tolerance: float = 1e-4
    """How far the reloaded checkpoint's loss may be from the trainer's own (absolute, in nats), for fp32
    training; bf16 training is checked to at least ``BF16_RELOAD_TOLERANCE`` (the fp32 reload differs by its
    rounding: 2e-4 to 4e-4 for a tiny model)."""
    heldout_fraction: float = 0.1
    """Share of documents kept out of training for held-out perplexity."""
    seed: int = 1234

    def __post_init__(self) -> None:
        errors = []
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            try:
                object.__setattr__(self, "lora", LoraSettings.parse(self.lora))
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        if self.method == "lora" and self.lora is None:
            object.__setattr__(self, "lora", LoraSettings())
        checks = [
            (self.method in METHODS, f"method must be one of {list(METHODS)}"),
            (self.method == "lora" or self.lora is None, "lora settings are given but method is not lora"),
            (8 <= self.seq_len <= MAX_SEQ_LEN, f"seq_len must be an integer from 8 to {MAX_SEQ_LEN}"),
            (1 <= self.micro_batch_size <= MAX_BATCH, f"micro_batch_size must be an integer from 1 to {MAX_BATCH}"),
            (1 <= self.gradient_accumulation_steps <= MAX_BATCH,
             f"gradient_accumulation_steps must be an integer from 1 to {MAX_BATCH}"),
            (1 <= self.train_steps <= MAX_STEPS, f"train_steps must be an integer from 1 to {MAX_STEPS}"),
            (_finite(self.learning_rate) and 0 < self.learning_rate <= 1,
             "learning_rate must be a finite number in (0, 1]"),
            (0 <= self.warmup_steps <= MAX_STEPS, f"warmup_steps must be an integer from 0 to {MAX_STEPS}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a finite number >= 0"),
            (_finite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm must be a finite number > 0"),
            (self.ranks == "auto" or (isinstance(self.ranks, int) and not isinstance(self.ranks, bool)
                                      and 1 <= self.ranks <= MAX_TRAIN_RANKS),
             f"ranks must be auto or a number from 1 to {MAX_TRAIN_RANKS}"),
            (self.zero_stage in (1, 2, 3), "zero_stage must be 1, 2 or 3"),
            (not self.offload_param or self.zero_stage == 3, "offload_param needs zero_stage 3"),
            (self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}"),
            (self.checkpoint_interval >= 0, "checkpoint_interval must not be negative (0: no checkpoints)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (_finite(self.reload_tolerance) and 0 < self.reload_tolerance < 1,
             "reload_tolerance must lie strictly between 0 and 1"),
            (_finite(self.heldout_fraction) and 0 < self.heldout_fraction < 1,
             "heldout_fraction must lie strictly between 0 and 1"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED,
             f"seed must be an integer from 0 to {MAX_SEED}"),
        ]
        errors += [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid training recipe: " + "; ".join(errors))

    @classmethod
    def load(cls, name: str = "default", extra_dirs: tuple[Path, ...] = (), **overrides: Any) -> TrainingRecipe:
        """Load a recipe by name from include/configs/training (or a configured extra folder), then apply overrides.

        Names only, never paths: the name comes from a Param that anyone who may trigger the DAG can set.
        """
        dirs = (RECIPE_DIR, *extra_dirs)
        known = available(extra_dirs)
        if not isinstance(name, str) or not RECIPE_NAME.fullmatch(name):
            raise ValueError(f"a training recipe is given by name (letters, digits, '_' or '-'); known: {known}")
        for folder in dirs:
            path = Path(folder) / f"{name}.yaml"
            if path.is_file():
                try:
                    return load_yaml_dataclass(cls, path, **overrides)
                except ValueError as exc:
                    message = str(exc)
                    raise ValueError(message if message.startswith(path.name) else f"{path.name}: {message}") from None
        raise FileNotFoundError(f"training recipe {name!r} not found; known recipes: {known}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.lora is not None:
            data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    def flat(self) -> dict[str, Any]:
        """Return the recipe as one level of ``name: value`` (lora.rank, ...), for tracking parameters."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": (",".join(v) if isinstance(v, list) else v) for k, v in value.items()})
            elif value is not None:
                out[key] = value
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def reload_tolerance_for(self, precision: str) -> float:
        """Return the reload check's tolerance for a run trained in ``precision`` (fp32 or bf16)."""
        return max(self.reload_tolerance, BF16_RELOAD_TOLERANCE) if precision == "bf16" else self.reload_tolerance

    def resolved_precision(self, bf16_supported: bool) -> str:
        """Return fp32 or bf16: what ``precision`` means on an accelerator with or without bf16."""
        if self.precision == "auto":
            return "bf16" if bf16_supported else "fp32"
        return self.precision

    def effective_zero_stage(self, world_size: int) -> int:
        """Return the ZeRO stage a run of ``world_size`` ranks uses: 0 (ZeRO off) for one rank without offload.

        ZeRO shards state across ranks; one rank holds it all anyway, and ZeRO's flat fp32 copies and gradient
        buckets then only cost time (0.56x a plain PyTorch loop on CPU, bench/train_throughput.py). Offload
        keeps its stage: moving state to host memory helps one GPU too.
        """
        if world_size == 1 and not (self.offload_optimizer or self.offload_param):
            return 0
        return self.zero_stage

    def deepspeed_config(self, world_size: int, bf16_supported: bool = False) -> dict[str, Any]:
        """Return the DeepSpeed configuration this recipe implies for a run of ``world_size`` ranks."""
        zero: dict[str, Any] = {"stage": self.effective_zero_stage(world_size)}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if zero["stage"] == 3:
            # The final weights are gathered onto rank 0 for the Hugging Face checkpoint.
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.max_grad_norm,
            "steps_per_print": 10**9,
            "zero_optimization": zero,
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": self.learning_rate, "weight_decay": self.weight_decay},
            },
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": self.learning_rate,
                    "warmup_num_steps": min(self.warmup_steps, self.train_steps),
                    "total_num_steps": max(self.train_steps, self.warmup_steps + 1),
                    "warmup_type": "linear",
                },
            },
        }
        if not self.offload_optimizer:
            # torch's AdamW: DeepSpeed's fused Adam needs a GPU build; with offload its CPU Adam is used.
            # torch's fused kernel (CPU and CUDA) updates every tensor in one pass: 0.12 s instead of 0.27 s
            # per step for SmolLM2-135M on two cores.
            config["optimizer"]["params"].update({"torch_adam": True, "fused": True})
        if self.resolved_precision(bf16_supported) == "bf16":
            config["bf16"] = {"enabled": True}
        return config


def available(extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    """Return the names of the recipes that can be picked."""
    return sorted({p.stem for d in (RECIPE_DIR, *extra_dirs) for p in Path(d).glob("*.yaml")})
