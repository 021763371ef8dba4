"""Document stores on object stores and other file systems (``s3://``, ``gs://``, ``abfs://``, ``memory://`` ...).

The same reading rules as a local folder (formats, size limit, UTF-8, JSONL records, counted skips), through
fsspec, the file-system layer Airflow's ObjectStoragePath is built on. The protocol's own package (s3fs,
gcsfs, adlfs) must be installed where the task runs; credentials come from its usual configuration.
"""

from __future__ import annotations

import logging

from nightshift.sources.document_store import ReadResult, take_file

log = logging.getLogger(__name__)


def read_object_store(url: str) -> ReadResult:
    """Return every supported document under ``url`` in a stable order, with counted skips."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {url!r}: {exc} (install the file system's fsspec package)") from exc
    if not fs.isdir(root):
        raise FileNotFoundError(f"document store {url!r} does not exist or is not a folder")
    root = root.rstrip("/")
    result = ReadResult()
    entries = fs.find(root, detail=True)
    for path in sorted(entries):
        info = entries[path]
        if info.get("type") != "file":
            continue
        rel = path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        take_file(rel, lambda info=info: int(info.get("size") or 0), lambda p=path: fs.cat_file(p), result)
    log.info("read %d documents from %s (%s); skipped %d (%s)", len(result.documents), url, result.formats,
             len(result.skipped), result.skip_reasons())
    return result
