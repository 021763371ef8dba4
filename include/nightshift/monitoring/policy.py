"""The monitoring policy (include/configs/monitoring.yaml): windows, drift, feedback and incident settings.

Every field is checked when the policy is read; an error names the file and the field by its path
(``monitoring.yaml: drift.auc_threshold``) and says what it must be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nightshift.configs import build, fraction, positive, read_yaml_mapping
from nightshift.settings import CONFIG_DIR

DEFAULT_POLICY = CONFIG_DIR / "monitoring.yaml"


@dataclass(frozen=True)
class Window:
    """Which answers are judged, and against what."""

    reference_hours: int = 168
    """Hours before the hour judged whose answers are its reference."""
    min_answers: int = 30
    """Fewer answers than this for a version in the hour or in its reference: not judged (the page says so)."""
    max_answers: int = 20_000
    """Answers read per version for the hour judged (the newest first), and for its reference (an equal share
    from each of its hours): bounds the task's time and memory."""
    similarity_sample: int = 1_000
    """Answers of the hour whose answer-to-prompt similarity is measured (embedding is the costly part)."""

    def check(self, where: str) -> None:
        positive(where, "reference_hours", self.reference_hours)
        positive(where, "min_answers", self.min_answers)
        positive(where, "similarity_sample", self.similarity_sample)
        if not isinstance(self.max_answers, int) or self.max_answers < self.min_answers:
            raise ValueError(f"{where}.max_answers must be an integer >= min_answers ({self.min_answers}), "
                             f"got {self.max_answers!r}")


@dataclass(frozen=True)
class Drift:
    """Prompt drift: a classifier tries to tell this hour's prompts from the reference's on their embeddings."""

    auc_threshold: float = 0.62
    """ROC AUC (on held-out prompts) above which the prompts have drifted; 0.5 is a coin toss."""
    sample: int = 500
    """Prompts per side embedded and classified at most."""
    min_prompts: int = 100
    """Fewer prompts than this in the hour or its reference: not judged. Below about 100 a side, the held-out
    AUC of two samples of the same traffic reaches 0.62 by chance a few hours a day."""
    seed: int = 7
    """Seed of the sample, the split and the classifier: the same hour gives the same verdict."""
    corpus_sample: int = 2000
    """Documents of the champion's training corpus embedded (once per dataset version) to tell how close the
    prompts are to what the model was trained on."""

    def check(self, where: str) -> None:
        if not isinstance(self.auc_threshold, int | float) or not 0.5 < self.auc_threshold < 1.0:
            raise ValueError(f"{where}.auc_threshold must be a number in (0.5, 1), got {self.auc_threshold!r}")
        positive(where, "sample", self.sample)
        positive(where, "min_prompts", self.min_prompts)
        positive(where, "corpus_sample", self.corpus_sample)
        if self.min_prompts < 20 or self.sample < self.min_prompts:
            raise ValueError(f"{where}: need 20 <= min_prompts <= sample (a classifier needs both sides), got "
                             f"min_prompts {self.min_prompts}, sample {self.sample}")


@dataclass(frozen=True)
class Feedback:
    """Live ratings and errors of the champion."""

    min_ratings: int = 20
    """Raters a version needs before its negative share is compared."""
    confidence: float = 0.95
    """Confidence of the Wilson intervals of the negative share."""
    max_error_rate: float = 0.05
    """Share of an hour's answers that may end in an error (a timeout, a failure) before an incident opens."""

    def check(self, where: str) -> None:
        positive(where, "min_ratings", self.min_ratings)
        if not isinstance(self.confidence, int | float) or not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"{where}.confidence must be a number in [0.5, 1), got {self.confidence!r}")
        fraction(where, "max_error_rate", self.max_error_rate)


@dataclass(frozen=True)
class Incidents:
    """How often a person hears of a check that keeps failing."""

    repeat_hours: float = 24.0
    """An open incident is sent again after this many hours while its check still fails."""

    def check(self, where: str) -> None:
        if not isinstance(self.repeat_hours, int | float) or self.repeat_hours <= 0:
            raise ValueError(f"{where}.repeat_hours must be a positive number, got {self.repeat_hours!r}")


@dataclass(frozen=True)
class Harvest:
    """Which rated answers harvest_feedback offers a person as training documents."""

    corrections: bool = True
    """Offer answers whose rater wrote a correction (the correction is the document's answer)."""
    min_rating: int | None = 1
    """Also offer answers rated at least this (the answer as given); None: corrections only."""
    max_batch: int = 200
    """Candidates in one batch, the oldest ratings first; the rest wait for the next run."""
    lookback_days: float = 30.0
    """Ratings older than this are not offered."""
    response_timeout_hours: float = 168.0
    """How long a batch waits for a person's decision; unanswered, it is rejected."""

    def check(self, where: str) -> None:
        if self.min_rating is not None and self.min_rating not in (-1, 0, 1):
            raise ValueError(f"{where}.min_rating must be -1, 0, 1 or empty, got {self.min_rating!r}")
        if not self.corrections and self.min_rating is None:
            raise ValueError(f"{where}: offers nothing; set corrections: true or a min_rating")
        positive(where, "max_batch", self.max_batch)
        for name in ("lookback_days", "response_timeout_hours"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{where}.{name} must be a positive number, got {value!r}")


RETRAIN_CHECKS = ("prompt_drift", "live_feedback", "error_rate")


@dataclass(frozen=True)
class Retrain:
    """When a failing check starts a retrain: ingest_corpus at once (fresh documents, approved feedback), whose new
    corpus version, if anything changed, trains the next candidate (finetune_model's report says why it ran)."""

    checks: tuple[str, ...] = ("prompt_drift", "live_feedback")
    """Checks whose failure starts one: prompt_drift, live_feedback, error_rate; empty: never."""
    min_hours_between: float = 24.0
    """At most one triggered retrain per this many hours (of the hours judged), however often a check fails."""

    def check(self, where: str) -> None:
        unknown = sorted(set(self.checks) - set(RETRAIN_CHECKS))
        if unknown:
            raise ValueError(f"{where}.checks: unknown checks {unknown}; known: {list(RETRAIN_CHECKS)}")
        if not isinstance(self.min_hours_between, int | float) or self.min_hours_between <= 0:
            raise ValueError(f"{where}.min_hours_between must be a positive number, got {self.min_hours_between!r}")


@dataclass(frozen=True)
class MonitoringPolicy:
    window: Window = field(default_factory=Window)
    drift: Drift = field(default_factory=Drift)
    feedback: Feedback = field(default_factory=Feedback)
    incidents: Incidents = field(default_factory=Incidents)
    harvest: Harvest = field(default_factory=Harvest)
    retrain: Retrain = field(default_factory=Retrain)

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> MonitoringPolicy:
        """Read and check a monitoring policy; a ValueError names the file and the field."""
        path = Path(path)
        data = read_yaml_mapping(path)
        sections = {"window": Window, "drift": Drift, "feedback": Feedback, "incidents": Incidents,
                    "harvest": Harvest, "retrain": Retrain}
        unknown = sorted(str(k) for k in set(data) - set(sections))
        if unknown:
            raise ValueError(f"{path.name}: unknown sections {unknown}; known: {sorted(sections)}")
        return cls(**{name: build(kind, data.get(name), f"{path.name}: {name}") for name, kind in sections.items()})
