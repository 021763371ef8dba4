"""The shards of a night's preparation: the raw documents split by id into tasks' inputs, the files each task
publishes, and the outcome every document ends with (kept with its text, or dropped at one step).

Apart from the task that writes them (``shard_worker.py``) and the outcome cache (``cache.py``), which both
read these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Outcome:
    """What the per-document steps decided for one document."""

    step: str | None = None
    """The step that dropped the document; None when it was kept."""
    reason: str | None = None
    text: str | None = None
    """Final text of a kept document."""
    language: str | None = None
    language_score: float | None = None
    pii: dict[str, int] = field(default_factory=dict)
    contaminated: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, data: str) -> Outcome:
        return cls(**json.loads(data))


def shard_files(work: Path, rank: int) -> dict[str, Path]:
    """Return the files one task publishes (all renamed into place when the task ends)."""
    return {
        "kept": work / f"kept-{rank:05d}.jsonl",
        "index": work / f"index-{rank:05d}.jsonl",
        "signatures": work / f"signatures-{rank:05d}.npy",
        "outcomes": work / f"outcomes-{rank:05d}.jsonl",
        "new_cache": work / f"cache-{rank:05d}.jsonl",
    }


def shard_raw(raw: Path, out_dir: Path, shards: int) -> list[Path]:
    """Split raw.jsonl into ``shards`` files of about equal bytes, with documents sorted by id.

    Only (id, offset, length) per document is held in memory; documents are copied by seeking.
    """
    import orjson

    entries: list[tuple[str, int, int]] = []
    empty: list[str] = []
    with raw.open("rb") as fh:
        offset = 0
        for line in fh:
            if line.strip():
                record = orjson.loads(line)
                if isinstance(record.get("content"), str) and record["content"]:
                    entries.append((str(record["id"]), offset, len(line)))
                else:  # datatrove's readers skip documents without text; they are counted here instead
                    empty.append(str(record.get("id")))
            offset += len(line)
    entries.sort()
    total = sum(e[2] for e in entries) or 1
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"raw-{i:05d}.jsonl" for i in range(shards)]
    with raw.open("rb") as src:
        written, shard = 0, 0
        outs = [p.with_name(p.name + ".tmp").open("wb") for p in paths]
        try:
            for _, off, length in entries:
                while shard < shards - 1 and written >= total * (shard + 1) / shards:
                    shard += 1
                src.seek(off)
                line = src.read(length)
                outs[shard].write(line if line.endswith(b"\n") else line + b"\n")
                written += length
        finally:
            for fh in outs:
                fh.close()
    (out_dir / "empty.json").write_text(json.dumps(sorted(empty)))
    for p in paths:
        p.with_name(p.name + ".tmp").replace(p)
    return paths


def source_of(doc_id: str) -> str:
    """Return the source of a document: the prefix of its id (collect_source names ids ``<source>/...``)."""
    return doc_id.split("/", 1)[0] if "/" in doc_id else ""
