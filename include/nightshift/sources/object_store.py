"""Document stores on object stores and other file systems (``s3://``, ``gs://``, ``abfs://``, ``memory://`` ...).

The same reading rules as a local folder (formats, size limit, UTF-8, JSONL records, counted skips), through
fsspec, the file-system layer Airflow's ObjectStoragePath is built on. The protocol's own package (s3fs,
gcsfs, adlfs) must be installed where the task runs; credentials come from its usual configuration.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from nightshift.sources.document_store import RawDocument, ReadResult, Skip, iter_file, skip_reasons

log = logging.getLogger(__name__)


def read_object_store(url: str) -> ReadResult:
    """Return every supported document under ``url`` in a stable order, with counted skips."""
    result = ReadResult()
    result.documents.extend(iter_object_store(url, result.skipped))
    return result


def iter_object_store(url: str, skipped: list[Skip]) -> Iterator[RawDocument]:
    """Yield every supported document under ``url`` in a stable order, appending what was not read to ``skipped``;
    files are opened as streams, so a large JSONL export is read record by record."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {url!r}: {exc} (install the file system's fsspec package)") from exc
    if not fs.isdir(root):
        raise FileNotFoundError(f"document store {url!r} does not exist or is not a folder")
    root = root.rstrip("/")
    formats: Counter[str] = Counter()
    first_skip = len(skipped)
    entries = fs.find(root, detail=True)
    for path in sorted(entries):
        info = entries[path]
        if info.get("type") != "file":
            continue
        rel = path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        for doc in iter_file(rel, lambda info=info: int(info.get("size") or 0), lambda p=path: fs.open(p, "rb"),
                             skipped):
            formats[doc.format] += 1
            yield doc
    log.info("read %d documents from %s (%s); skipped %d (%s)", sum(formats.values()), url,
             dict(sorted(formats.items())), len(skipped) - first_skip, skip_reasons(skipped[first_skip:]))
