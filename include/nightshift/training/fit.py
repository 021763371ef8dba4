"""Check a recipe against the base model it will train, before any rank starts.

A recipe that validates on its own can still fail on the base: LoRA target modules that the architecture
does not have (``c_attn`` is GPT-2's, a Llama has ``q_proj``), or a block longer than the model's context.
Those fail inside every training rank, on every retry; here they fail once, at plan time, naming the field.

The architecture is built on PyTorch's ``meta`` device from the base's config.json: module names and shapes
without allocating or reading a single weight (about 0.2 s for SmolLM2-135M).
"""

from __future__ import annotations

import json
from pathlib import Path

from nightshift.training.recipe import TrainingRecipe

MAX_LISTED = 12


def linear_module_names(base_dir: Path) -> list[str]:
    """Return the dotted names of the base architecture's layers that LoRA can adapt.

    peft adapts linear layers, GPT-2's Conv1D (its ``c_attn`` is one) and embeddings.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # transformers raises many kinds of error for a config it cannot build (an unknown model_type, a missing or
    # mistyped field, an architecture that is not a causal LM); all of them mean the same here.
    try:
        config = AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - see above; the type is named, the message (config text) is not
        raise ValueError(f"the base model {Path(base_dir).name} cannot be built from its config.json by this "
                         f"transformers ({type(exc).__name__}); check its model_type and fields") from None
    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
"""Where configs keep their context length: Llama-style, GPT-2-style, and older names."""


def context_length(config: dict) -> int | None:
    """Return the longest input the base model's positions cover, or None when its config names none."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _matches(target: str, names: list[str]) -> bool:
    """Return whether peft would find ``target``: a module named exactly so, or ending in ``.target``."""
    return any(name == target or name.endswith("." + target) for name in names)


def check_recipe_fits(recipe: TrainingRecipe, base_dir: Path, recipe_name: str = "the recipe") -> None:
    """Raise ValueError naming the recipe field that the base model in ``base_dir`` cannot train with."""
    config_path = Path(base_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"the base model {Path(base_dir).name} has no readable config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"the base model {Path(base_dir).name} has a config.json that is not a JSON object")
    problems = []
    context = context_length(config)
    if context is not None and recipe.seq_len > context:
        problems.append(f"seq_len {recipe.seq_len} is longer than the base model's context ({context} tokens)")
    if recipe.method == "lora" and recipe.lora is not None:
        names = linear_module_names(base_dir)
        missing = [t for t in recipe.lora.target_modules if not _matches(t, names)]
        if missing:
            kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
            problems.append(
                f"lora.target_modules {missing} are not layers of the base model ({config.get('model_type', '?')});"
                f" its adaptable layers are {kinds[:MAX_LISTED]}{' ...' if len(kinds) > MAX_LISTED else ''}")
    if problems:
        raise ValueError(f"{recipe_name} does not fit the base model {Path(base_dir).name}: " + "; ".join(problems))
