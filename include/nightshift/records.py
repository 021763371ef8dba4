"""The small records that stages hand each other.

Stages never reach into each other's internals: ingestion hands fine-tuning a ``DatasetVersion``,
evaluation hands the gate two ``EvaluationReport``s, the gate hands the registry a ``GateDecision``.
Records travel through XCom as plain dicts (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """A dataclass that round-trips through JSON-friendly dicts."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class DatasetVersion(Record):
    """One immutable corpus version: a git commit and tag in the data repository, its bytes in DVC."""

    name: str
    """Dataset name, the folder in the data repository."""
    tag: str
    """Git tag of the version, e.g. ``corpus-v0003``."""
    rev: str
    """Git commit SHA the tag points at."""
    md5: str
    """DVC content hash of the corpus file: equal hashes mean identical bytes."""
    path: str
    """Path of the corpus file inside the data repository."""
    documents: int
    bytes: int
    repo: str
    """Location of the data repository."""
    created: bool = False
    """True when this call created the version, False when identical bytes were already versioned."""

    @property
    def ref(self) -> str:
        return f"{self.tag}@{self.rev[:10]}"


@dataclass(frozen=True)
class PackedDataset(Record):
    """Token blocks of one dataset version, split into train and held-out by document."""

    train_path: str
    heldout_path: str
    train_blocks: int
    heldout_blocks: int
    train_tokens: int
    heldout_tokens: int
    train_documents: int
    heldout_documents: int
    seq_len: int
    tokenizer: str


@dataclass(frozen=True)
class EvaluationReport(Record):
    """Metrics of one model on one held-out set and golden set, from one harness."""

    model: str
    """What was evaluated: ``candidate``, ``champion v3`` or ``base <name>``."""
    perplexity: float
    """Held-out perplexity over every held-out token."""
    heldout_tokens: int
    golden_perplexity: float
    """Perplexity of the reference answers of the golden question/answer set, given the questions."""
    golden_items: int
    samples: list[dict[str, str]] = field(default_factory=list)
    """A few greedy answers to golden questions, for people to read."""
    seconds: float = 0.0

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_perplexity": self.perplexity,
            f"{prefix}_golden_perplexity": self.golden_perplexity,
        }


@dataclass(frozen=True)
class GateCheck(Record):
    metric: str
    candidate: float
    baseline: float
    limit: float
    passed: bool

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.metric}: candidate {_fmt(self.candidate)} vs baseline {_fmt(self.baseline)} "
            f"(limit {_fmt(self.limit)}) {verdict}"
        )


@dataclass(frozen=True)
class GateDecision(Record):
    """Whether the candidate may replace the champion, and why."""

    passed: bool
    baseline: str
    checks: list[dict[str, Any]]
    reasons: list[str]

    @property
    def summary(self) -> str:
        head = "PROMOTE" if self.passed else "REJECT"
        return f"{head} (against {self.baseline}): " + "; ".join(self.reasons)


@dataclass(frozen=True)
class ModelVersionRecord(Record):
    """A model version in the registry."""

    name: str
    version: int
    run_id: str
    source: str
    dataset_tag: str = ""
    fingerprint: str = ""
    aliases: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"
