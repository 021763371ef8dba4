"""The ``feedback`` source: answers of the endpoint that people rated or corrected and a data engineer approved
(harvest_feedback), one document per answer, read from the approved batches.

A document is the question and the answer (the rater's correction when there is one), as the request log kept
them, scrubbed. Its provenance travels in the corpus row: the answer's id, the model version that answered,
the rating, who approved the batch and when.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nightshift.sources.document_store import RawDocument, Skip

PROVENANCE = ("response_id", "model_version", "kind", "rating", "rated_at", "approved_by", "decided_at")


def default_path() -> Path:
    """Return where harvest_feedback puts approved batches: ``$NIGHTSHIFT_HOME/feedback/approved``."""
    from nightshift.settings import load_settings

    return load_settings().home / "feedback" / "approved"


class FeedbackReader:
    """Approved feedback batches, one document per approved answer, in batch and line order."""

    def __init__(self, path: str | None = None) -> None:
        self.explicit = bool(path)
        """A path named in sources.yaml must exist; the default folder appears with the first approved batch."""
        self.path = Path(path) if path else default_path()
        self.skips: list[Skip] = []
        self.kinds: Counter[str] = Counter()

    def read(self) -> Iterator[RawDocument]:
        self.skips, self.kinds = [], Counter()
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"the feedback source's path is a file, not the folder of approved batches: "
                                     f"{self.path}")
        if not self.path.is_dir():
            if self.explicit:
                self.skips.append(Skip(self.path.name, "no such folder of approved feedback batches"))
            return
        for batch in sorted(self.path.glob("*.jsonl")):
            if batch.is_symlink() or not batch.is_file():
                self.skips.append(Skip(batch.name, "not a batch file written by harvest_feedback"))
                continue
            with batch.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    where = f"{batch.name}:{line_no}"
                    try:
                        row = json.loads(line)
                        question, answer = str(row["question"]), str(row["answer"])
                        response_id = str(row["response_id"])
                    except (ValueError, KeyError, TypeError):
                        self.skips.append(Skip(where, "unreadable feedback row"))
                        continue
                    self.kinds[str(row.get("kind"))] += 1
                    yield RawDocument(
                        id=response_id, source=where, format="text",
                        content=f"Question: {question}\n\nAnswer: {answer}\n",
                        meta={"feedback": {k: row[k] for k in PROVENANCE if k in row}})

    def summary(self) -> dict[str, Any]:
        return {"formats": {"text": sum(self.kinds.values())} if self.kinds else {},
                "kinds": dict(sorted(self.kinds.items())),
                "skipped": dict(Counter(s.reason for s in self.skips).most_common())}
