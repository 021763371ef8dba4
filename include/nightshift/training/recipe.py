"""Fine-tuning recipes: versioned YAML files in include/configs/training/, validated into a dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.configs import load_yaml_dataclass
from nightshift.settings import CONFIG_DIR

RECIPE_DIR = CONFIG_DIR / "training"
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class TrainingRecipe:
    """Hyper-parameters of one fine-tune."""

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
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 shards optimizer state and gradients across ranks."""
    heldout_fraction: float = 0.1
    """Share of documents kept out of training for held-out perplexity."""
    seed: int = 1234

    def __post_init__(self) -> None:
        checks = [
            (self.seq_len >= 8, "seq_len must be at least 8"),
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.train_steps >= 1, "train_steps must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0 <= self.warmup_steps, "warmup_steps must not be negative"),
            (self.weight_decay >= 0, "weight_decay must not be negative"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (0 < self.heldout_fraction < 1, "heldout_fraction must lie strictly between 0 and 1"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid training recipe: " + "; ".join(errors))

    @classmethod
    def load(cls, name: str = "default", extra_dirs: tuple[Path, ...] = (), **overrides: Any) -> TrainingRecipe:
        """Load a recipe by name from include/configs/training (or a configured extra folder), then apply overrides.

        Names only, never paths: the name comes from a Param that anyone who may trigger the DAG can set.
        """
        dirs = (RECIPE_DIR, *extra_dirs)
        known = sorted({p.stem for d in dirs for p in Path(d).glob("*.yaml")})
        if not isinstance(name, str) or not RECIPE_NAME.fullmatch(name):
            raise ValueError(f"a training recipe is given by name (letters, digits, '_' or '-'); known: {known}")
        for folder in dirs:
            path = Path(folder) / f"{name}.yaml"
            if path.is_file():
                return load_yaml_dataclass(cls, path, **overrides)
        raise FileNotFoundError(f"training recipe {name!r} not found; known recipes: {known}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def deepspeed_config(self) -> dict[str, Any]:
        """Return the DeepSpeed configuration this recipe implies."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.max_grad_norm,
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": self.zero_stage},
            "optimizer": {
                "type": "AdamW",
                # torch's AdamW: DeepSpeed's fused kernels need a GPU build.
                "params": {"lr": self.learning_rate, "weight_decay": self.weight_decay, "torch_adam": True},
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
