"""whylogs profiles of a corpus: one row of text metrics per document, profiled into a mergeable sketch.

The metrics frame is also what the quality suite checks (nightshift.quality.suite), so the profile and the
expectations describe the same numbers. Document text never enters the frame or the profile.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NUMERIC = ("chars", "words", "lines", "tokens", "pii_scrubbed")
"""Numeric columns of the metrics frame (tokens only for the sampled documents)."""
CATEGORICAL = ("source", "kind", "format", "language")
FLAGS = ("contaminated",)
COLUMNS = ("id", *CATEGORICAL, *NUMERIC, *FLAGS)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TOKEN_BATCH = 256


def import_whylogs():
    """Import whylogs with its usage telemetry off and its one NumPy 2 incompatibility bridged.

    whylogs 1.6.4 (its last release) tests string columns with ``np.unicode_``, an alias NumPy 2 removed;
    ``np.str_`` is the same type.
    """
    os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")
    import numpy as np

    if not hasattr(np, "unicode_"):
        np.unicode_ = np.str_  # type: ignore[attr-defined]
    import whylogs

    return whylogs


@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens with the base model's tokenizer on a fixed-size, content-seeded sample of documents.

    Tokenizing every document would cost as much as the rest of preparation (the SmolLM2 tokenizer runs at
    ~4 MB/s here); a profile's sketch needs a few thousand values, so the ``sample`` documents with the
    smallest content hashes are tokenized: the same corpus always gets the same sample, and a changed one a
    fresh, unbiased one.
    """

    tokenizer_file: Path | None
    sample: int = 5000

    def load(self):
        if self.tokenizer_file is None or not Path(self.tokenizer_file).is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_file))


@dataclass(frozen=True)
class CorpusMetrics:
    """The metrics frame of a corpus and what was measured how."""

    frame: Any
    """pandas DataFrame, one row per document, columns COLUMNS (no text)."""
    tokenized: int
    """Documents whose tokens were counted (the others have tokens = NaN)."""
    tokenizer: str
    seconds: float


def _documents(corpus: Path) -> Iterator[dict[str, Any]]:
    import orjson

    with corpus.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


def corpus_metrics(corpus: Path, source_kinds: dict[str, str], counter: TokenCounter) -> CorpusMetrics:
    """Return one row of text metrics per document of a prepared corpus (streamed; only a sample's text is held)."""
    import numpy as np
    import pandas as pd

    started = time.monotonic()
    rows: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    sample: list[tuple[int, int, str]] = []  # max-heap by hash (negated): the `sample` smallest content hashes
    for index, doc in enumerate(_documents(corpus)):
        text = doc.get("text") or ""
        prep = (doc.get("meta") or {}).get("prep") or {}
        source = str(doc.get("id", "")).split("/", 1)[0]
        rows["id"].append(str(doc.get("id", "")))
        rows["source"].append(source)
        rows["kind"].append(source_kinds.get(source, "unknown"))
        rows["format"].append(str(doc.get("format") or "unknown"))
        rows["language"].append(str(prep.get("language") or "unknown"))
        rows["chars"].append(len(text))
        rows["words"].append(len(text.split()))  # whitespace words: 15x faster than a \w+ regex here
        rows["lines"].append(text.count("\n") + 1 if text else 0)
        rows["tokens"].append(np.nan)
        rows["pii_scrubbed"].append(sum((prep.get("pii") or {}).values()))
        rows["contaminated"].append(bool(prep.get("contaminated")))
        if counter.sample > 0:
            key = int(str(doc.get("sha256") or "0")[:15] or "0", 16)
            item = (-key, index, text)
            if len(sample) < counter.sample:
                heapq.heappush(sample, item)
            elif item > sample[0]:
                heapq.heapreplace(sample, item)
    tokenizer = counter.load() if sample else None
    if tokenizer is not None:
        chosen = sorted((index, text) for _, index, text in sample)
        for start in range(0, len(chosen), TOKEN_BATCH):
            batch = chosen[start:start + TOKEN_BATCH]
            encoded = tokenizer.encode_batch_fast([text for _, text in batch], add_special_tokens=False)
            for (index, _), enc in zip(batch, encoded, strict=True):
                rows["tokens"][index] = len(enc.ids)
    elif counter.sample > 0 and rows["id"]:
        log.warning("no tokenizer at %s: the profile has no token counts", counter.tokenizer_file)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["tokens"] = frame["tokens"].astype("float64")
    seconds = time.monotonic() - started
    return CorpusMetrics(frame=frame, tokenized=len(sample) if tokenizer is not None else 0,
                         tokenizer=str(counter.tokenizer_file) if tokenizer is not None else "", seconds=seconds)


def profile_frame(frame: Any):
    """Return the whylogs DatasetProfileView of a metrics frame (every column but the document id)."""
    why = import_whylogs()
    return why.log(pandas=frame.drop(columns=["id"])).view()


def write_profile(view: Any, path: Path) -> Path:
    """Write a profile's protobuf bytes atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(view.serialize())
    tmp.replace(path)
    return path


def read_profile(data: bytes):
    """Return the DatasetProfileView serialized in ``data``."""
    import_whylogs()
    from whylogs.core import DatasetProfileView

    return DatasetProfileView.deserialize(data)


def summarize(view: Any, bins: int = 20) -> dict[str, Any]:
    """Return a JSON-friendly summary of a profile: per column counts, moments, quantiles, a histogram, top items."""
    columns: dict[str, Any] = {}
    for name, column in sorted(view.get_columns().items()):
        counts = column.get_metric("counts")
        entry: dict[str, Any] = {
            "n": int(counts.n.value) if counts else 0,
            "null": int(counts.null.value) if counts else 0,
        }
        dist = column.get_metric("distribution")
        if dist is not None and not dist.kll.value.is_empty():
            kll = dist.kll.value
            lo, hi = float(kll.get_min_value()), float(kll.get_max_value())
            entry.update({
                "mean": float(dist.mean.value), "stddev": float(dist.stddev), "min": lo, "max": hi,
                "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, kll.get_quantiles(list(QUANTILES)),
                                                                  strict=True)},
                "histogram": histogram(kll, lo, hi, bins),
            })
        items = column.get_metric("frequent_items")
        if items is not None and name in CATEGORICAL + FLAGS:
            top = items.to_summary_dict().get("frequent_strings") or []
            entry["top"] = [{"value": str(i.value), "count": int(i.est)} for i in top[:12]]
        columns[name] = entry
    documents = max((c["n"] for c in columns.values()), default=0)
    return {"documents": documents, "columns": columns}


def histogram(kll: Any, lo: float, hi: float, bins: int) -> dict[str, list[float]]:
    """Return bin edges and estimated counts of a KLL sketch over [lo, hi]."""
    import numpy as np

    if hi <= lo:
        return {"edges": [lo, lo + 1.0], "counts": [float(kll.get_n())]}
    edges = np.linspace(lo, hi, bins + 1)
    pmf = kll.get_pmf(list(edges[1:-1]))  # len(split points) + 1 masses
    return {"edges": [float(e) for e in edges], "counts": [float(p) * kll.get_n() for p in pmf]}

