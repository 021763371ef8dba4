"""Extract and normalise the text of raw documents; read and write corpus files."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nightshift.extraction import html_to_text
from nightshift.sources.document_store import RawDocument

log = logging.getLogger(__name__)

_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
# ftfy leaves printable ASCII without HTML entities or control characters unchanged (tested in
# tests/prep/test_clean.py); skipping it there saves most of its cost on English text.
_FTFY_WORK = re.compile(r"[&\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Document:
    """A cleaned document, one line of the corpus file."""

    id: str
    source: str
    format: str
    text: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance from the source (URL, fetch time, HTTP status, content hash for web pages)."""


def extract_text(doc: RawDocument) -> str:
    """Return the readable text of a document: main content as markdown for HTML, the text itself otherwise."""
    if doc.format != "html":
        return doc.content
    return html_to_text(doc.content)


def normalize_text(text: str) -> str:
    """Return text with mojibake and Unicode fixed (NFC), trailing spaces cut and blank-line runs collapsed."""
    import ftfy

    if not text.isascii() or _FTFY_WORK.search(text):
        text = ftfy.fix_text(text, normalization="NFC")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    return _BLANK_RUNS.sub("\n\n", text).strip()


def write_corpus(documents: Iterable[Document], path: Path) -> Path:
    """Write documents as JSONL with a byte-stable encoding, so equal corpora have equal hashes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for doc in documents:
            fh.write(json.dumps(asdict(doc), ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_corpus(path: Path) -> Iterator[Document]:
    """Yield the documents of a corpus file written by ``write_corpus``."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield Document(**json.loads(line))
