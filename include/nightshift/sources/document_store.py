"""Read documents from a local document store (a folder, given as a path or a file:// URI)."""

from __future__ import annotations

import codecs
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

log = logging.getLogger(__name__)

FORMATS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".html": "html",
    ".htm": "html",
    ".jsonl": "jsonl",
}
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RawDocument:
    """A document as read from the store, before any cleaning."""

    id: str
    """Stable id: the path relative to the store, plus ``#<record id>`` for JSONL records."""
    source: str
    """Where in the store it came from (relative path, plus ``:<line>`` for JSONL), so that the corpus bytes
    depend on the documents alone and not on where the store is mounted."""
    format: str
    content: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance kept in the corpus row: for web pages the URL, fetch time, HTTP status and content hash."""


@dataclass(frozen=True)
class Skip:
    """Something in the store that was not read, and why."""

    location: str
    reason: str


@dataclass
class ReadResult:
    documents: list[RawDocument] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def formats(self) -> dict[str, int]:
        return dict(sorted(Counter(d.format for d in self.documents).items()))

    def skip_reasons(self) -> dict[str, int]:
        return dict(Counter(s.reason.split(":")[0] for s in self.skipped).most_common())


class SourceNotAllowed(ValueError):
    """The source lies outside the folders this installation allows reading from."""


def resolve_store(source: str, allowed_roots: tuple[Path, ...] | None = None) -> Path:
    """Return the folder a ``source`` parameter names; raise a clear error when it is not usable.

    With ``allowed_roots``, the folder (after following links) must lie inside one of them: a person who may
    trigger a DAG must not gain the worker's access to every other file.
    """
    if not source or not source.strip():
        raise ValueError("`source` is empty: give a local folder or a file:// URI of a document store")
    parsed = urlparse(source)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {source!r} names host {parsed.netloc!r}; only local files are supported")
        path = Path(url2pathname(unquote(parsed.path)))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(
            f"source scheme {parsed.scheme!r} is not supported yet: give a local folder or a file:// URI"
        )
    else:
        path = Path(source).expanduser()
    resolved = path.resolve()
    if allowed_roots is not None and not any(resolved.is_relative_to(root) for root in allowed_roots):
        raise SourceNotAllowed(
            f"document store {source!r} is outside the folders this installation reads from "
            f"({', '.join(str(r) for r in allowed_roots)}); an administrator can add one to NIGHTSHIFT_SOURCE_ROOTS"
        )
    if not path.exists():
        raise FileNotFoundError(f"document store {source!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"document store {source!r} is a file; give the folder that holds the documents")
    return resolved


def read_store(root: Path) -> ReadResult:
    """Return every supported document under ``root`` in a stable order, with counted skips."""
    result = ReadResult()
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    for path in files:
        rel = path.relative_to(root).as_posix()
        if not path.resolve().is_relative_to(root):
            result.skipped.append(Skip(rel, "link outside the store: not followed"))
            continue
        take_file(rel, lambda p=path: p.stat().st_size, path.read_bytes, result)
    log.info(
        "read %d documents from %d files under %s (%s); skipped %d (%s)",
        len(result.documents), len(files), root, result.formats, len(result.skipped), result.skip_reasons(),
    )
    return result


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes) -> str:
    """Decode a file's bytes: UTF-16 or UTF-32 when a byte-order mark says so, else UTF-8 (with or without BOM)."""
    for bom, codec in _BOMS:  # UTF-32 LE first: its mark begins with UTF-16 LE's
        if data.startswith(bom):
            return data.decode(codec)
    return data.decode("utf-8-sig")


def take_file(rel: str, size: Callable[[], int], load: Callable[[], bytes], result: ReadResult) -> None:
    """Read one file of a store into ``result``: a document (or several, for JSONL) or a counted skip."""
    fmt = FORMATS.get(PurePosixPath(rel).suffix.lower())
    if fmt is None:
        result.skipped.append(Skip(rel, f"unsupported extension: {PurePosixPath(rel).suffix or '(none)'}"))
        return
    try:
        n = size()
        if n > MAX_FILE_BYTES:
            result.skipped.append(Skip(rel, f"file too large: {n} bytes > {MAX_FILE_BYTES}"))
            return
        text = decode_text(load())
    except UnicodeDecodeError as exc:
        result.skipped.append(Skip(rel, f"not UTF-8 text: byte {exc.start}, and no UTF-16/32 byte-order mark"))
        return
    except OSError as exc:
        result.skipped.append(Skip(rel, f"unreadable: {type(exc).__name__}"))
        return
    if fmt == "jsonl":
        _read_jsonl(rel, text, result)
    else:
        result.documents.append(RawDocument(id=rel, source=rel, format=fmt, content=text))


def _read_jsonl(rel: str, text: str, result: ReadResult) -> None:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{rel}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            result.skipped.append(Skip(where, f"invalid JSON: {exc.msg}"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            result.skipped.append(Skip(where, "no string field 'text'"))
            continue
        record_id = record.get("id", lineno)
        fmt = record.get("format") if record.get("format") in ("markdown", "text", "html") else "text"
        result.documents.append(
            RawDocument(id=f"{rel}#{record_id}", source=f"{rel}:{lineno}", format=fmt, content=record["text"])
        )


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def write_raw(documents: Iterable[RawDocument], path: Path) -> int:
    """Write raw documents as JSONL as they come (write, then publish); return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for doc in documents:
            fh.write(json.dumps(doc.__dict__, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def read_raw(path: Path) -> list[RawDocument]:
    """Return the raw documents written by ``write_raw``."""
    with path.open(encoding="utf-8") as fh:
        return [RawDocument(**json.loads(line)) for line in fh]
