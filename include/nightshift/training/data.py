"""Tokenize a corpus with the base model's tokenizer and pack it into fixed-length blocks.

The held-out documents are also kept as text (heldout.jsonl): token ids mean something only to the tokenizer
that made them, and a champion built on another base model must score the same text with its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.prep.clean import read_corpus
from nightshift.records import PackedDataset

log = logging.getLogger(__name__)


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Return True when a document belongs to the held-out split; stable across versions and runs."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < fraction


HELDOUT_WINDOW_BYTES = 1024
"""Held-out text is written in windows of at most this many UTF-8 bytes, each scored on its own: about 250
tokens of an English BPE, within the context of the models we evaluate (one with a shorter context reads a
window in parts)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return a hash of what decides a tokenizer's ids: vocabulary, merges, added tokens, normalisation, specials.

    Two models with equal fingerprints turn a text into the same ids, so their per-token metrics compare.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    elif backend.truncation is None and backend.padding is None:
        spec = backend.to_str()  # about 30 ms for 50,000 tokens; parsing it would take ten times as long
    else:  # truncation and padding are settings of a call, not of the vocabulary
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(backend.to_str())
        plain.no_truncation()
        plain.no_padding()
        spec = plain.to_str()
    special = json.dumps([tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(f"{spec}\n{special}".encode()).hexdigest()[:24]


def text_windows(text: str, limit: int = HELDOUT_WINDOW_BYTES) -> list[str]:
    """Return ``text`` cut into consecutive pieces of at most ``limit`` UTF-8 bytes, at whitespace where possible."""
    raw = text.encode("utf-8")
    out = []
    start = 0
    while start < len(raw):
        end = min(start + limit, len(raw))
        if end < len(raw):
            space = max(raw.rfind(b" ", start, end), raw.rfind(b"\n", start, end))
            if space > start + limit // 2:
                end = space + 1
            while end > start + 1 and raw[end] & 0xC0 == 0x80:  # never cut inside a character
                end -= 1
        out.append(raw[start:end].decode("utf-8"))
        start = end
    return out


def write_heldout_text(docs: list[Any], path: Path) -> int:
    """Write the held-out documents' text as JSON lines of windows (``doc``, ``text``); return the bytes written."""
    total = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for doc in docs:
            for window in text_windows(doc.text):
                out.write(json.dumps({"doc": doc.id, "text": window}, ensure_ascii=False) + "\n")
                total += len(window.encode("utf-8"))
    tmp.replace(path)
    return total


def read_heldout_text(path: Path) -> list[str]:
    """Return the windows of held-out text written by ``write_heldout_text``."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


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
    """Write train.npy and heldout.npy (int32 blocks, -1 = padding) and heldout.jsonl (the held-out text), and
    return what they hold."""
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
    heldout_bytes = write_heldout_text(heldout_docs, out_dir / "heldout.jsonl")
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
        heldout_text_path=str(out_dir / "heldout.jsonl"),
        heldout_bytes=heldout_bytes,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    log.info(
        "packed %d train documents into %d blocks of %d tokens; %d held-out documents, %d tokens",
        packed.train_documents, packed.train_blocks, seq_len, packed.heldout_documents, packed.heldout_tokens,
    )
    return packed
