"""Read documents from a local document store (a folder, given as a path or a file:// URI).

Markdown, text and HTML files are one document each, up to MAX_FILE_BYTES. A JSONL export is streamed record
by record: lines end at ``\\n`` only (a JSON string may hold U+2028 or U+0085 raw), each record is bounded by
MAX_RECORD_BYTES and the file not at all. Text that cannot be written as UTF-8 (undecodable bytes, a lone
surrogate escape such as ``"\\ud83d"``) is a counted skip of that file or record, never a repair: a repaired
document would silently differ from its source, and the other readers (SQL rows, files) skip it the same way.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
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
"""The largest markdown, text or HTML file read (one document)."""
MAX_RECORD_BYTES = 4 * 1024 * 1024
"""The largest JSONL record read: a million characters of text (a SQL row's limit) in any encoding."""
_CHUNK = 1024 * 1024


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
        return skip_reasons(self.skipped)


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
    result.documents.extend(iter_store(root, result.skipped))
    return result


def iter_store(root: Path, skipped: list[Skip]) -> Iterator[RawDocument]:
    """Yield every supported document under ``root`` in a stable order, appending what was not read to ``skipped``.

    Documents come one at a time, so a large JSONL export never sits in memory: only the record being read does.
    """
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    formats: Counter[str] = Counter()
    first_skip = len(skipped)
    for path in files:
        rel = path.relative_to(root).as_posix()
        if not path.resolve().is_relative_to(root):
            skipped.append(Skip(printable(rel), "link outside the store: not followed"))
            continue
        for doc in iter_file(rel, lambda p=path: p.stat().st_size, lambda p=path: p.open("rb"), skipped):
            formats[doc.format] += 1
            yield doc
    log.info(
        "read %d documents from %d files under %s (%s); skipped %d (%s)", sum(formats.values()), len(files), root,
        dict(sorted(formats.items())), len(skipped) - first_skip, skip_reasons(skipped[first_skip:]),
    )


def skip_reasons(skips: Iterable[Skip]) -> dict[str, int]:
    """Return how many skips there are of each reason (the part of the reason before its first colon)."""
    return dict(Counter(s.reason.split(":")[0] for s in skips).most_common())


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
# A str holding one of these cannot be written as UTF-8. Strictly decoded bytes never produce them, but a JSON
# "\ud83d" escape without its pair does, and so do file names and SQLite text that are not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_text(data: bytes) -> str:
    """Decode a file's bytes: UTF-16 or UTF-32 when a byte-order mark says so, else UTF-8 (with or without BOM)."""
    codec = _bom_codec(data)
    return data.decode(codec) if codec else data.decode("utf-8-sig")


def _bom_codec(head: bytes) -> str | None:
    for bom, codec in _BOMS:  # UTF-32 LE first: its mark begins with UTF-16 LE's
        if head.startswith(bom):
            return codec
    return None


def encodable(text: str) -> bool:
    """Return whether ``text`` can be written as UTF-8 (it holds no lone surrogate)."""
    return _SURROGATE.search(text) is None


def printable(text: str) -> str:
    """Return ``text`` with each lone surrogate replaced by U+FFFD, for naming something that is skipped."""
    return _SURROGATE.sub("\ufffd", text)


def iter_file(rel: str, size: Callable[[], int], open_binary: Callable[[], BinaryIO],
              skipped: list[Skip]) -> Iterator[RawDocument]:
    """Yield the documents of one file of a store (one, or one per JSONL record); append what was not read to
    ``skipped``. A bad file or record costs that file or record, never the store."""
    suffix = PurePosixPath(rel).suffix
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        skipped.append(Skip(printable(rel), f"unsupported extension: {printable(suffix[:16]) or '(none)'}"))
        return
    if not encodable(rel):
        skipped.append(Skip(printable(rel), "not UTF-8 text: the file name"))
        return
    try:
        if fmt == "jsonl":
            with open_binary() as fh:
                yield from _read_jsonl(rel, fh, skipped)
            return
        n = size()
        if n <= MAX_FILE_BYTES:
            with open_binary() as fh:
                data = fh.read(MAX_FILE_BYTES + 1)  # bounded even when the size was stale
            n = len(data)
        if n > MAX_FILE_BYTES:
            skipped.append(Skip(rel, f"file too large: {n} bytes, over the {MAX_FILE_BYTES} byte limit of one "
                                     f"{fmt} document (a JSONL export has no file limit, only one per record)"))
            return
        text = decode_text(data)
    except UnicodeDecodeError as exc:
        skipped.append(Skip(rel, f"not UTF-8 text: byte {exc.start}, and no UTF-16/32 byte-order mark"))
        return
    except OSError as exc:
        skipped.append(Skip(rel, f"unreadable: {type(exc).__name__}"))
        return
    yield RawDocument(id=rel, source=rel, format=fmt, content=text)


def _read_jsonl(rel: str, fh: BinaryIO, skipped: list[Skip]) -> Iterator[RawDocument]:
    """Yield one document per record of a JSONL file, read line by line with each line bounded."""
    head = fh.read(4)
    codec = _bom_codec(head)
    lines: Iterator[bytes | str | None]
    if codec is None:
        lines = _lines(_chunks(fh, head), b"\n", MAX_RECORD_BYTES)
    else:  # rare: decoded as a stream, since a UTF-16/32 record cannot be decoded apart from its file
        lines = _lines(codecs.iterdecode(_chunks(fh, head), codec), "\n", MAX_RECORD_BYTES // 2)
    lineno = 0
    try:
        for lineno, line in enumerate(lines, start=1):
            doc = _record(rel, lineno, line, skipped)
            if doc is not None:
                yield doc
    except UnicodeDecodeError:
        skipped.append(Skip(f"{rel}:{lineno + 1}", f"not UTF-8 text: broken {codec} from here on, not read"))


def _chunks(fh: BinaryIO, head: bytes) -> Iterator[bytes]:
    yield head
    while chunk := fh.read(_CHUNK):
        yield chunk



def _lines(chunks: Iterable[Any], newline: Any, limit: int) -> Iterator[Any]:
    """Yield each line of ``chunks`` (split on ``newline`` only), or None for a line longer than ``limit``.

    Not str.splitlines, which also splits on U+2028, U+0085, form feeds and other characters that a JSON
    string may hold raw; and not the file object's own readline, which is unbounded on some fsspec files.
    """
    buffer = newline[:0]
    too_long = False
    for chunk in chunks:
        buffer += chunk
        start = 0
        while (end := buffer.find(newline, start)) != -1:
            yield None if too_long or end - start > limit else buffer[start:end]
            too_long = False
            start = end + 1
        buffer = buffer[start:]
        if len(buffer) > limit:  # the rest of this line is dropped as it comes, so memory stays bounded
            too_long, buffer = True, newline[:0]
    if too_long:
        yield None
    elif buffer:
        yield None if len(buffer) > limit else buffer


def _record(rel: str, lineno: int, line: bytes | str | None, skipped: list[Skip]) -> RawDocument | None:
    """Return the document of one JSONL line, or None (a blank line, or a counted skip)."""
    where = f"{rel}:{lineno}"
    if line is None:
        skipped.append(Skip(where, f"record too large: over {MAX_RECORD_BYTES} bytes"))
        return None
    if isinstance(line, bytes):
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            skipped.append(Skip(where, f"not UTF-8 text: byte {exc.start} of the record"))
            return None
    if not line.strip(" \t\r\n"):  # JSON's whitespace only
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        skipped.append(Skip(where, f"invalid JSON: {exc.msg}"))
        return None
    except RecursionError:
        skipped.append(Skip(where, "invalid JSON: nested too deeply"))
        return None
    except ValueError:  # valid JSON Python refuses to convert: an integer of more than 4,300 digits
        skipped.append(Skip(where, "invalid JSON: a number too long to convert"))
        return None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        skipped.append(Skip(where, "no string field 'text'"))
        return None
    doc_id = f"{rel}#{_record_id(record.get('id'), lineno)}"
    # The line was decoded strictly, so a lone surrogate can only come from a "\ud83d" escape: look only then.
    if "\\u" in line and not (encodable(record["text"]) and encodable(doc_id)):
        skipped.append(Skip(where, "not UTF-8 text: a lone surrogate (a \\ud800-\\udfff escape without its pair)"))
        return None
    fmt = record.get("format") if record.get("format") in ("markdown", "text", "html") else "text"
    return RawDocument(id=doc_id, source=where, format=fmt, content=record["text"])


MAX_ID_CHARS = 200


def _record_id(value: Any, lineno: int) -> str:
    """Return a record's id as text: its string or integer ``id`` (a long one hashed), else its line number."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return str(lineno)
    text = str(value)
    if len(text) > MAX_ID_CHARS:  # ids travel into every report and file name of the night: keep them short
        return f"{text[:64]}~{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return text


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
