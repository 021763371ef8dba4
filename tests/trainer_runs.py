"""Shared by the trainer tests: the tiny recipe, and one call that runs the real launcher with CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TESTS
from nightshift.training.launch import free_port, launch_command, local_env, run_local
from nightshift.training.recipe import TrainingRecipe
from nightshift.training.trainer import TrainerConfig


def tiny_recipe(**overrides) -> TrainingRecipe:
    return TrainingRecipe.load("tiny", (TESTS / "e2e" / "recipes",), **overrides)


def trainer_config(out: Path, base: Path, train: Path, recipe: TrainingRecipe, **extra) -> Path:
    config = TrainerConfig(base_model=str(base), train_path=str(train), output_dir=str(out / "candidate"),
                           recipe=recipe.to_dict(), **extra)
    return config.write(out / "trainer.json")


def run_trainer(out: Path, base: Path, train: Path, recipe: TrainingRecipe, fault: str | None = None,
                ranks: int = 2, **extra) -> dict:
    """Train with the real ``deepspeed`` launcher and CPU ranks; return metrics.json."""
    path = trainer_config(out, base, train, recipe, **extra)
    env = local_env()
    env.pop("NIGHTSHIFT_FAULT", None)
    if fault:
        env["NIGHTSHIFT_FAULT"] = fault
    run_local(launch_command(path, ranks, free_port()), env, out / "trainer.log")
    return json.loads((out / "candidate" / "metrics.json").read_text())
