"""Reload check: the saved Hugging Face checkpoint, loaded with transformers alone, reproduces the trainer's loss.

Run in a fresh process after training and before anything is evaluated or registered::

    python -m nightshift.training.verify --output-dir <run>/candidate

The trainer recorded in ``metrics.json`` the loss of its own trained model on a fixed batch of training
blocks. Here the checkpoint is checked for completeness first (every shard its index lists, every weight
the architecture expects: transformers would otherwise fill a missing weight with random values and only
warn), then loaded with ``AutoModelForCausalLM`` and must give the same loss on the same blocks within
the recipe's ``reload_tolerance``. A ZeRO-3 save that missed a partition or a LoRA merge that lost the
adapters fails here, with an error that says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


class ReloadCheckFailed(RuntimeError):
    """The saved checkpoint is incomplete or does not behave like the model the trainer trained."""


@dataclass(frozen=True)
class ReloadResult:
    expected_loss: float
    reloaded_loss: float
    difference: float
    tolerance: float
    blocks: int
    parameters: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_files(checkpoint: Path) -> None:
    """Raise ReloadCheckFailed when the checkpoint lacks its config or any weight file its index lists."""
    if not (checkpoint / "config.json").is_file():
        raise ReloadCheckFailed(f"{checkpoint} has no config.json: the trainer did not finish saving")
    index = checkpoint / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReloadCheckFailed(f"{index} is not a valid weight index ({type(exc).__name__})") from None
        missing = [s for s in shards if not (checkpoint / Path(s).name).is_file()]
        if missing:
            raise ReloadCheckFailed(
                f"checkpoint {checkpoint} is missing {len(missing)} of {len(shards)} weight shards listed in "
                f"{INDEX}: {', '.join(missing[:5])}; the save was incomplete, train again"
            )
    elif not (checkpoint / "model.safetensors").is_file():
        raise ReloadCheckFailed(f"{checkpoint} has no model.safetensors and no {INDEX}")


def reload_check(checkpoint: Path, data_path: Path, blocks: list[int], expected: float,
                 tolerance: float) -> ReloadResult:
    """Load ``checkpoint`` with transformers, compute the loss on ``blocks``; raise ReloadCheckFailed if it differs."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    check_files(checkpoint)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReloadCheckFailed(f"transformers cannot load {checkpoint}: {type(exc).__name__}: {exc}") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", [])) - tied)
    problems = {"missing": missing, "unexpected": sorted(info.get("unexpected_keys", [])),
                "mismatched": [str(m[0]) for m in info.get("mismatched_keys", [])]}
    if any(problems.values()):
        detail = "; ".join(f"{k} weights: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                           for k, v in problems.items() if v)
        raise ReloadCheckFailed(f"checkpoint {checkpoint} does not hold the whole model ({detail})")
    model.eval()
    data = np.load(data_path, mmap_mode="r")
    batch = torch.as_tensor(np.asarray(data[blocks]).astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.float().item()
    difference = abs(loss - expected)
    result = ReloadResult(expected_loss=expected, reloaded_loss=loss, difference=difference, tolerance=tolerance,
                          blocks=len(blocks), parameters=sum(p.numel() for p in model.parameters()))
    if not math.isfinite(loss) or not difference <= tolerance:
        raise ReloadCheckFailed(
            f"the reloaded checkpoint gives loss {loss:.6f} on the reference batch, the trainer's model gave "
            f"{expected:.6f} (difference {difference:.2e}, tolerance {tolerance:.0e}): the saved weights are not "
            "the trained ones"
        )
    return result


def verify_output(output_dir: Path) -> ReloadResult:
    """Run the reload check on a trainer's output folder (checkpoint/ and metrics.json)."""
    output_dir = Path(output_dir)
    try:
        spec = json.loads((output_dir / "metrics.json").read_text())["reload_check"]
    except (OSError, ValueError, KeyError) as exc:
        raise ReloadCheckFailed(f"{output_dir}/metrics.json has no reload_check entry ({type(exc).__name__}); "
                                "the trainer did not finish") from None
    return reload_check(output_dir / "checkpoint", Path(spec["data"]), list(spec["blocks"]), float(spec["loss"]),
                        float(spec["tolerance"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="the trainer's output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = verify_output(args.output_dir)
    except ReloadCheckFailed as exc:
        print(json.dumps({"passed": False, "error": str(exc)}))
        return 1
    print(json.dumps({"passed": True, **result.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
