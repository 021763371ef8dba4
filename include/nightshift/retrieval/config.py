"""retrieval.yaml: how documents are chunked, how the index is built and how many chunks an answer reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nightshift.configs import load_yaml_dataclass


@dataclass(frozen=True)
class RetrievalConfig:
    enabled: bool = True
    """false: ingest_corpus indexes no version (and ``+rag`` answers 503 index_unavailable)."""
    chunk_tokens: int = 200
    """Tokens of the embedding model per chunk (its window is 256, special tokens included)."""
    chunk_overlap: int = 40
    """Tokens a chunk shares with the one before it, so a sentence cut at a boundary is whole in one of them."""
    top_k: int = 4
    """Chunks retrieved per question (a request may ask for fewer or more, up to ``max_top_k``)."""
    max_top_k: int = 16
    context_tokens: int = 768
    """At most this many of the answering model's tokens of retrieved text go into a prompt (also bounded by the
    model's window, the question and the answer's max_tokens); what does not fit is cut and said so."""
    min_score: float = 0.2
    """Chunks less similar than this (cosine, -1..1) to the question are not used."""
    exact_below: int = 200_000
    """File indexes of fewer chunks are searched exactly (FAISS flat); larger ones with HNSW."""
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 128
    embedding_model_name: str = "all-MiniLM-L6-v2"
    """The name /v1/embeddings answers to (its ``model`` field)."""
    evaluate: bool = True
    """finetune_model compares base, fine-tuned, base+RAG and fine-tuned+RAG on the golden items that name their
    source documents."""

    def check(self, where: str) -> RetrievalConfig:
        if not 16 <= self.chunk_tokens <= 4096:
            raise ValueError(f"{where}: chunk_tokens must be between 16 and 4096")
        if not 0 <= self.chunk_overlap < self.chunk_tokens // 2 + 1:
            raise ValueError(f"{where}: chunk_overlap must be at least 0 and at most half of chunk_tokens")
        if not 1 <= self.top_k <= self.max_top_k <= 100:
            raise ValueError(f"{where}: need 1 <= top_k <= max_top_k <= 100")
        if not 16 <= self.context_tokens <= 131_072:
            raise ValueError(f"{where}: context_tokens must be between 16 and 131072")
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"{where}: min_score is a cosine similarity, between -1 and 1")
        if self.exact_below < 0 or not 4 <= self.hnsw_m <= 128 or not 8 <= self.hnsw_ef_construction <= 2048 \
                or not 8 <= self.hnsw_ef_search <= 4096:
            raise ValueError(f"{where}: exact_below >= 0, hnsw_m 4..128, hnsw_ef_construction 8..2048, "
                             "hnsw_ef_search 8..4096")
        if not self.embedding_model_name.strip() or len(self.embedding_model_name) > 200:
            raise ValueError(f"{where}: embedding_model_name must be a short name")
        return self

    @classmethod
    def load(cls, path: Path) -> RetrievalConfig:
        return load_yaml_dataclass(cls, path).check(Path(path).name)
