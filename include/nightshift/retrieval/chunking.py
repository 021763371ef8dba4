"""Token-aware chunks with overlap: windows of the embedding model's tokens, cut on token boundaries of the text.

A chunk's id is its document's id and its ordinal (``<doc>#<n>``); its hash is the SHA-256 of its text, the key of
the embedding cache, so an unchanged chunk of a changed document, or of a document that moved, is not embedded
again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

MAX_CHUNKS_PER_DOCUMENT = 20_000
"""A bound on one document's chunks (4 M tokens at the defaults): beyond it the rest is not indexed, and counted."""
MAX_DOCUMENT_CHARS = 2_000_000
"""Characters of one document that are chunked (its tokens' offsets are held at once: about 130 bytes per
character); the rest is not indexed, and the document is counted as cut. Sources cap documents far below it."""


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    text: str
    start: int
    """Character offsets of the chunk in its document's text."""
    end: int

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def chunk_text(doc_id: str, text: str, tokenizer, tokens: int, overlap: int) -> tuple[list[Chunk], bool]:
    """Return the chunks of one document and whether it was cut at ``MAX_CHUNKS_PER_DOCUMENT``.

    Windows of ``tokens`` tokens step by ``tokens - overlap``; each chunk is the text from its first token's start
    to its last token's end (whitespace between tokens kept as written). A text of no tokens has no chunk."""
    cut_text = len(text) > MAX_DOCUMENT_CHARS
    text = text[:MAX_DOCUMENT_CHARS]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(a, b) for a, b in encoded["offset_mapping"] if b > a]
    if not offsets:
        return [], cut_text
    step = max(1, tokens - overlap)
    chunks: list[Chunk] = []
    start = 0
    while start < len(offsets):
        if len(chunks) >= MAX_CHUNKS_PER_DOCUMENT:
            return chunks, True
        window = offsets[start:start + tokens]
        begin, end = window[0][0], window[-1][1]
        chunks.append(Chunk(f"{doc_id}#{len(chunks)}", doc_id, text[begin:end], begin, end))
        if start + tokens >= len(offsets):
            break
        start += step
    return chunks, cut_text
