"""Tokenize a corpus with the base model's tokenizer and pack it into fixed-length blocks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from nightshift.prep.clean import read_corpus
from nightshift.records import PackedDataset

log = logging.getLogger(__name__)


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Return True when a document belongs to the held-out split; stable across versions and runs."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < fraction


def pack(token_lists: list[list[int]], seq_len: int, keep_tail: bool) -> np.ndarray:
    """Concatenate token lists and cut them into rows of ``seq_len``; keep_tail pads the last row with -1."""
    flat = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int32)
    full = len(flat) // seq_len
    rows = flat[: full * seq_len].reshape(full, seq_len)
    rest = flat[full * seq_len :]
    if keep_tail and len(rest) > 1:
        tail = np.full((1, seq_len), -1, dtype=np.int32)
        tail[0, : len(rest)] = rest
        rows = np.concatenate([rows, tail])
    return rows


def tokenize_and_pack(
    corpus_path: Path, tokenizer_dir: Path, out_dir: Path, seq_len: int, heldout_fraction: float
) -> PackedDataset:
    """Write train.npy and heldout.npy (int32 blocks, -1 = padding) and return what they hold."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no end-of-sequence token; documents cannot be separated")
    train_docs, heldout_docs = [], []
    for doc in read_corpus(corpus_path):
        (heldout_docs if is_heldout(doc.id, heldout_fraction) else train_docs).append(doc)
    if not heldout_docs and len(train_docs) > 1:
        # Tiny corpora can miss the hash bucket entirely; hold out the last document so evaluation has data.
        heldout_docs.append(train_docs.pop())
    if not train_docs:
        raise ValueError(f"{corpus_path} has no training documents; the corpus needs at least two documents")

    def encode(docs) -> list[list[int]]:
        ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        return [list(x) + [eos] for x in ids]

    train_tokens, heldout_tokens = encode(train_docs), encode(heldout_docs)
    train = pack(train_tokens, seq_len, keep_tail=False)
    heldout = pack(heldout_tokens, seq_len, keep_tail=True)
    n_train = sum(map(len, train_tokens))
    if len(train) == 0:
        raise ValueError(
            f"training split has {n_train} tokens, fewer than one block of seq_len={seq_len}: "
            "add documents or lower seq_len in the recipe"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "train.npy", train)
    np.save(out_dir / "heldout.npy", heldout)
    packed = PackedDataset(
        train_path=str(out_dir / "train.npy"),
        heldout_path=str(out_dir / "heldout.npy"),
        train_blocks=len(train),
        heldout_blocks=len(heldout),
        train_tokens=n_train,
        heldout_tokens=int((heldout >= 0).sum()),
        train_documents=len(train_docs),
        heldout_documents=len(heldout_docs),
        seq_len=seq_len,
        tokenizer=str(tokenizer_dir),
    )
    log.info(
        "packed %d train documents into %d blocks of %d tokens; %d held-out documents, %d tokens",
        packed.train_documents, packed.train_blocks, seq_len, packed.heldout_documents, packed.heldout_tokens,
    )
    return packed
