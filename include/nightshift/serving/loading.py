"""Loading: a model version into memory, its context window fitted to the memory budget.

Everything this package takes from torch and transformers is imported once, at start-up
(``import_libraries``), and one model loads at a time in a process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.records import ModelVersionRecord
from nightshift.serving.limits import MIB, ModelShape, fit_window
from nightshift.settings import ServingLimits

log = logging.getLogger(__name__)

MIN_WINDOW = 256


def process_rss() -> int:
    """Return the resident memory of this process in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def checkpoint_bytes(folder: Path) -> int:
    """Return the size of the weight files of a Hugging Face checkpoint folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


class ModelTooLarge(RuntimeError):
    """The memory budget cannot hold this model and one request."""


@dataclass
class LoadedModel:
    """A model version in memory, with the window and memory capacity it was fitted to."""

    record: ModelVersionRecord
    model: Any
    tokenizer: Any
    window: int
    """Context window: prompt plus completion tokens."""
    shape: ModelShape
    model_bytes: int
    capacity_bytes: int
    """Memory left for in-flight requests."""
    eos_ids: frozenset[int]
    loaded_at: float = field(default_factory=time.time)

    def cost(self, total_tokens: int, chunk: int, all_logits: bool = False) -> int:
        return self.shape.request_bytes(total_tokens, chunk, all_logits)


_LOADING = threading.Lock()
"""One model load at a time in a process: the champion's and the candidate's watchers may both load at once."""


def import_libraries() -> None:
    """Import torch and every name this engine takes from transformers, once, in the calling thread.

    transformers hands out its names through a lazy module that imports on first use; two watcher threads
    resolving them at the same moment can meet a half-imported module and raise ImportError, which would mark a
    healthy champion as failed. The application calls this before any watcher thread starts.
    """
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DynamicCache,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )


def load_model(
    record: ModelVersionRecord, folder: Path, limits: ServingLimits, runtime_bytes: int
) -> LoadedModel:
    """Load a checkpoint and fit its context window to the memory budget; raise ModelTooLarge if it cannot fit."""
    with _LOADING:
        return _load_model(record, folder, limits, runtime_bytes)


def _load_model(record: ModelVersionRecord, folder: Path, limits: ServingLimits, runtime_bytes: int) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    shape = ModelShape.of(config)
    model_bytes = checkpoint_bytes(folder)
    budget = limits.memory_budget_mb * MIB
    # Room for two models: during a swap the old one serves while the new one loads.
    capacity = budget - runtime_bytes - 2 * model_bytes
    native = int(getattr(config, "max_position_embeddings", 0) or 2048)
    configured = min(native, limits.max_model_len or native)
    window = fit_window(shape, configured, limits.prefill_chunk, capacity)
    if window < min(MIN_WINDOW, configured):
        need = (runtime_bytes + 2 * model_bytes + shape.request_bytes(MIN_WINDOW, limits.prefill_chunk, True)) // MIB
        raise ModelTooLarge(
            f"{record.label} needs about {need} MiB for the runtime, two copies of its {model_bytes // MIB} MiB of "
            f"weights and one {MIN_WINDOW}-token request; the budget is {limits.memory_budget_mb} MiB "
            "(raise NIGHTSHIFT_SERVE_MEMORY_MB)"
        )
    if window < configured:
        log.warning("%s: context window limited to %d tokens (configured: %d) by the memory budget "
                    "(NIGHTSHIFT_SERVE_MEMORY_MB)", record.label, window, configured)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    eos: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(t) for t in source)
    return LoadedModel(
        record=record, model=model, tokenizer=tokenizer, window=window, shape=shape, model_bytes=model_bytes,
        capacity_bytes=max(0, capacity), eos_ids=frozenset(eos),
    )

