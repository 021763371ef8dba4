"""The small records that stages hand each other.

Stages never reach into each other's internals: ingestion hands fine-tuning a ``DatasetVersion``,
evaluation hands the gate ``MetricComparison``s (from two ``EvaluationReport``s), the gate hands the registry
a ``GateDecision``, and the registry keeps every ``ChampionMove``.
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


def json_safe(value: Any) -> Any:
    """Return ``value`` with every non-finite float written as ``"nan"``, ``"inf"`` or ``"-inf"``.

    XCom (and strict JSON) has no NaN or infinity, yet a diverged model's perplexity is infinite and an
    unmeasured metric is NaN: they travel as these strings, and ``MetricComparison.from_dict`` reads them back.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def as_float(value: Any) -> float:
    """Read a number written by json_safe (or None) back as a float; None is NaN."""
    return math.nan if value is None else float(value)


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
    heldout_text_path: str = ""
    """The held-out documents as text (JSON lines of windows), so every model scores them with its own
    tokenizer; empty for datasets packed before it was written."""
    heldout_bytes: int = 0
    """UTF-8 bytes of the held-out text."""
    tokenizer_fingerprint: str = ""
    """Hash of the tokenizer that made the token blocks (``training.data.tokenizer_fingerprint``)."""


@dataclass(frozen=True)
class EvaluationReport(Record):
    """Metrics of one model on one held-out set and golden set, from one harness, with the per-example values."""

    model: str
    """What was evaluated: ``candidate``, ``champion v3`` or ``base <name>``."""
    metrics: dict[str, float]
    """Aggregate value of every measured metric (``heldout.perplexity``, ``golden.token_f1``, ...); NaN for one
    that could not be measured on this model (``unmeasured`` says why)."""
    heldout_tokens: int
    golden_items: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    """One entry per golden item: question, reference, expect, answer (forbidden strings redacted), nll/tokens and
    each answer metric."""
    heldout: dict[str, Any] = field(default_factory=dict)
    """Per piece of the held-out split, for the paired bootstrap: ``nll`` (summed), ``tokens`` and, when it was
    scored as text, ``bytes`` (the same pieces of text for every model); ``note`` says why it is empty."""
    judge: dict[str, Any] = field(default_factory=dict)
    """The judge's model and counts (calls, cached, scored, timeouts, errors, malformed, truncated, fallbacks), or
    why there was none."""
    seconds: float = 0.0
    tokenizer: str = ""
    """Fingerprint of the model's tokenizer: per-token metrics of two reports compare only when they are equal."""
    unmeasured: dict[str, str] = field(default_factory=dict)
    """Metrics of the suite this model could not be measured on, and why (e.g. its tokenizer does not spell the
    text back, so its bits per byte would mean nothing); a comparison on them is unmeasured."""

    @property
    def perplexity(self) -> float:
        return self.metrics.get("heldout.perplexity", math.nan)

    @property
    def golden_perplexity(self) -> float:
        return self.metrics.get("golden.perplexity", math.nan)

    def summary(self) -> dict[str, Any]:
        """The report without its per-example arrays: small enough for XCom and alerts."""
        return {"model": self.model, "metrics": self.metrics, "heldout_tokens": self.heldout_tokens,
                "golden_items": self.golden_items, "judge": self.judge, "seconds": self.seconds,
                "tokenizer": self.tokenizer, "unmeasured": self.unmeasured}


@dataclass(frozen=True)
class MetricComparison(Record):
    """Candidate against champion on one metric: both values, the difference and its paired bootstrap interval."""

    metric: str
    candidate: float
    baseline: float
    difference: float
    """candidate - champion; for perplexities and bits per byte the relative change candidate / champion - 1."""
    low: float
    high: float
    n: int
    """Paired examples the interval is computed over."""
    items: int
    """Examples the metric is defined on (n < items: some were not scored, e.g. by the judge)."""
    higher_is_better: bool
    relative: bool = False
    safety: bool = False
    unmeasured: str = ""
    """Why the metric was not measured (e.g. no judge), empty when it was."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricComparison:
        numbers = ("candidate", "baseline", "difference", "low", "high")
        return super().from_dict({k: as_float(v) if k in numbers else v for k, v in data.items()})

    @property
    def measured(self) -> bool:
        return not self.unmeasured

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.candidate, self.baseline, self.difference, self.low, self.high))

    def describe(self) -> str:
        if self.unmeasured:
            return f"{self.metric}: not measured ({self.unmeasured})"
        unit = "relative change" if self.relative else "difference"
        return (f"{self.metric}: candidate {_fmt(self.candidate)} vs champion {_fmt(self.baseline)}, {unit} "
                f"{_fmt(self.difference, signed=True)} [{_fmt(self.low, signed=True)}, {_fmt(self.high, signed=True)}]"
                f" over {self.n} examples")


@dataclass(frozen=True)
class GateCheck(Record):
    metric: str
    condition: str
    """The rule in better/worse terms, e.g. ``worse by at most 2% (worse end of the interval)``."""
    outcome: str
    """``passed``, ``failed`` or ``skipped`` (an unmeasured metric whose rule allows it)."""
    detail: str

    @property
    def passed(self) -> bool:
        return self.outcome != "failed"

    def describe(self) -> str:
        verdict = {"passed": "ok", "failed": "FAILED", "skipped": "skipped"}.get(self.outcome, self.outcome)
        return f"{self.metric} ({self.condition}): {self.detail} {verdict}"


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


def _fmt(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


@dataclass(frozen=True)
class ChampionMove(Record):
    """One move of the champion alias: from which version to which, when, by whom, why, on what evidence."""

    id: str
    to_version: int
    from_version: int | None
    kind: str
    """``promotion`` (the gate passed), ``rollout`` (its live steps passed) or ``rollback`` (a person asked)."""
    by: str
    """Who moved it: the person who triggered the DAG run, or ``schedule``."""
    dag_run: str
    """``dag_id/run_id`` of the run that moved it."""
    reason: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    """The evaluation that justified the target: MLflow run id, report artifact, gate summary."""
    requested_at: str = ""
    at: str = ""
    """When the alias moved (ISO 8601, UTC); empty while the move is pending."""
    state: str = "pending"
    """``pending`` (recorded, alias not yet confirmed moved), ``done``, or ``aborted`` (the champion moved
    elsewhere while this move was pending, so it never happened and the history ignores it); ``rejected``: a
    release a person or the approval's timeout declined (kept apart from the moves; the alias never moved)."""
