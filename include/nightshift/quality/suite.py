"""The Great Expectations suite every prepared corpus must pass before it is versioned."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import load_yaml_dataclass
from nightshift.settings import CONFIG_DIR

log = logging.getLogger(__name__)

DEFAULT_POLICY = CONFIG_DIR / "quality.yaml"


@dataclass(frozen=True)
class QualityPolicy:
    """Thresholds of the corpus suite (include/configs/quality.yaml)."""

    min_documents: int = 1
    """A corpus with fewer documents fails: an empty or truncated crawl must not become a version."""
    min_chars: int = 1
    """Shortest acceptable document, in characters after cleaning."""
    max_chars: int = 200_000
    """Longest acceptable document; longer ones are usually dumps or concatenation errors."""
    length_mostly: float = 1.0
    """Fraction of documents that must lie within the length bounds (1.0 = every one)."""
    min_source_share: float = 0.5
    """Share of the night's sources that must be collected; below it the night makes no version (alerted)."""
    max_pii_hits: int = 0
    """Findings a second PII and secret detector pass may make in any one document after scrubbing."""

    def __post_init__(self) -> None:
        if self.min_documents < 1:
            raise ValueError(f"quality policy: min_documents must be >= 1, got {self.min_documents}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"quality policy: need 1 <= min_chars <= max_chars, got {self.min_chars}..{self.max_chars}"
            )
        if not 0.0 < self.length_mostly <= 1.0:
            raise ValueError(f"quality policy: length_mostly must be in (0, 1], got {self.length_mostly}")
        if self.max_pii_hits < 0:
            raise ValueError(f"quality policy: max_pii_hits must be >= 0, got {self.max_pii_hits}")
        if not 0.0 < self.min_source_share <= 1.0:
            raise ValueError(f"quality policy: min_source_share must be in (0, 1], got {self.min_source_share}")

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> QualityPolicy:
        return load_yaml_dataclass(cls, path)


@dataclass(frozen=True)
class QualityReport:
    """Outcome of one validation: overall success and one line per failed expectation."""

    success: bool
    evaluated: int
    failed: int
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.success:
            return f"all {self.evaluated} expectations passed"
        return f"{self.failed} of {self.evaluated} expectations failed: " + "; ".join(self.failures)


def build_expectations(policy: QualityPolicy) -> list[Any]:
    """Return the corpus expectations for a policy."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=policy.min_documents),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=policy.min_chars, max_value=policy.max_chars, mostly=policy.length_mostly
        ),
        # The second pass: the preparation recipe's scrubber must have left no personal data or credentials.
        gxe.ExpectColumnValuesToBeBetween(column="pii_hits", min_value=0, max_value=policy.max_pii_hits),
    ]


def validate_frame(frame: Any, policy: QualityPolicy) -> QualityReport:
    """Validate a DataFrame with columns ``id`` and ``text`` against the corpus suite."""
    from nightshift.prep.pii import Scrubber

    scrubber = Scrubber()
    frame = frame.assign(pii_hits=[len(scrubber.find(text)) if isinstance(text, str) else 0 for text in frame["text"]])
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(name="nightshift")
        .add_dataframe_asset(name="corpus")
        .add_batch_definition_whole_dataframe(name="whole_corpus")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="corpus", expectations=build_expectations(policy)))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="corpus", data=batch_definition, suite=suite)
    )
    # Offending rows are named by their ids; document text never reaches a log, the UI or an alert.
    result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": ["id"],
                     "partial_unexpected_count": 5}
    result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
    failures = [_describe_failure(r) for r in result.results if not r.success]
    stats = result.statistics
    report = QualityReport(
        success=bool(result.success),
        evaluated=int(stats["evaluated_expectations"]),
        failed=int(stats["unsuccessful_expectations"]),
        failures=failures,
    )
    log.info("quality: %s", report.summary())
    return report


def validate_corpus(corpus_path: Path, policy: QualityPolicy) -> QualityReport:
    """Validate a corpus JSONL file against the corpus suite."""
    import pandas as pd

    frame = pd.read_json(corpus_path, lines=True, dtype={"id": str, "text": str})
    if frame.empty:
        frame = pd.DataFrame({"id": pd.Series(dtype=str), "text": pd.Series(dtype=str)})
    return validate_frame(frame[["id", "text"]], policy)


def _describe_failure(result: Any) -> str:
    """Describe a failed expectation by its settings, counts and the ids of offending documents, never their text."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "regex")}
    outcome = result.result or {}
    detail = []
    if isinstance(outcome.get("observed_value"), int | float):
        detail.append(f"observed {outcome['observed_value']}")
    if outcome.get("unexpected_count"):
        ids = [_clip(row.get("id")) for row in (outcome.get("partial_unexpected_index_list") or [])[:5]]
        detail.append(f"{outcome['unexpected_count']} unexpected" + (f", ids {ids}" if ids else ""))
    return f"{config.type}({kwargs}) " + ", ".join(detail)


def _clip(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else f"{text[:width]}..."
