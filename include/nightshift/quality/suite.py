"""The Great Expectations suite every prepared corpus must pass before it is versioned."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nightshift.configs import load_yaml_dataclass
from nightshift.settings import CONFIG_DIR

log = logging.getLogger(__name__)

DEFAULT_POLICY = CONFIG_DIR / "quality.yaml"


@dataclass(frozen=True)
class DropBudget:
    """How much of one source a single preparation step may drop before a person is told (quality.yaml)."""

    max_share: float = 1.0
    """Share of one source's documents (as they entered preparation) one step may drop; 1.0: no budget."""
    min_documents: int = 5
    """Sources with fewer documents are not judged: a share of a handful says little."""
    block: bool = False
    """True: a step over budget fails the night (alerted) and makes no dataset version; false: it only warns."""

    def __post_init__(self) -> None:
        if isinstance(self.max_share, bool) or not isinstance(self.max_share, int | float) \
                or not 0.0 < self.max_share <= 1.0:
            raise ValueError(f"quality policy: drop_budget.max_share must be a share in (0, 1], got {self.max_share!r}")
        if isinstance(self.min_documents, bool) or not isinstance(self.min_documents, int) or self.min_documents < 1:
            raise ValueError(f"quality policy: drop_budget.min_documents must be an integer >= 1, got "
                             f"{self.min_documents!r}")
        if not isinstance(self.block, bool):
            raise ValueError(f"quality policy: drop_budget.block must be true or false, got {self.block!r}")

    @classmethod
    def from_mapping(cls, data: Any) -> DropBudget:
        """Return the budget a quality.yaml mapping describes; errors name the unknown or mistyped field."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"quality policy: drop_budget must be a mapping (max_share, min_documents, block), got "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ValueError(f"quality policy: drop_budget: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)


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
    length_quantiles: dict = field(default_factory=dict)
    """Bounds of the length distribution: quantile -> [low, high] in characters (null: open), e.g. 0.5: [200, null]."""
    min_source_share: float = 0.5
    """Share of the night's sources that must be collected; below it the night makes no version (alerted)."""
    min_documents_per_source: int = 0
    """Documents each collected source must contribute to the corpus (0: no check)."""
    max_pii_hits: int = 0
    """Findings a second PII and secret detector pass may make in any one document after scrubbing."""
    languages: tuple = ()
    """Languages the corpus should be in (codes as the profile reports them); empty: no check."""
    min_language_share: float = 1.0
    """Share of documents that must be in one of ``languages``."""
    max_near_duplicate_share: float = 1.0
    """Share of the prepared documents the near-duplicate step may remove; more means a crawl loop or a mirror."""
    drop_budget: DropBudget = field(default_factory=DropBudget)
    """Share of one source one preparation step may drop before the night warns (or, with block, fails)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_budget", DropBudget.from_mapping(self.drop_budget))
        if self.min_documents < 1:
            raise ValueError(f"quality policy: min_documents must be >= 1, got {self.min_documents}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"quality policy: need 1 <= min_chars <= max_chars, got {self.min_chars}..{self.max_chars}"
            )
        for name in ("length_mostly", "min_source_share", "min_language_share", "max_near_duplicate_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or (name in ("length_mostly", "min_source_share") and value == 0):
                raise ValueError(f"quality policy: {name} must be a share in (0, 1], got {value}")
        if self.max_pii_hits < 0:
            raise ValueError(f"quality policy: max_pii_hits must be >= 0, got {self.max_pii_hits}")
        if self.min_documents_per_source < 0:
            raise ValueError(f"quality policy: min_documents_per_source must be >= 0, got "
                             f"{self.min_documents_per_source}")
        if isinstance(self.languages, str) or not all(isinstance(c, str) and c for c in self.languages):
            raise ValueError(f"quality policy: languages must be a list of language codes, got {self.languages!r}")
        object.__setattr__(self, "languages", tuple(self.languages))
        quantiles = {}
        for q, bounds in dict(self.length_quantiles).items():
            ok = isinstance(q, int | float) and 0 <= float(q) <= 1 and isinstance(bounds, list | tuple) \
                and len(bounds) == 2 and all(b is None or isinstance(b, int | float) for b in bounds) \
                and any(b is not None for b in bounds)
            if not ok or (None not in bounds and bounds[0] > bounds[1]):
                raise ValueError(f"quality policy: length_quantiles must map a quantile in [0, 1] to [low, high] "
                                 f"characters (null for an open side), got {q!r}: {bounds!r}")
            quantiles[float(q)] = (bounds[0], bounds[1])
        object.__setattr__(self, "length_quantiles", dict(sorted(quantiles.items())))

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
    data_docs: list[str] = field(default_factory=list)
    """Data Docs validation pages, relative to the site folder (when rendered)."""
    skipped: list[str] = field(default_factory=list)
    """Checks of the policy that could not apply to this corpus, and why."""

    def summary(self) -> str:
        if self.success:
            return f"all {self.evaluated} expectations passed"
        return f"{self.failed} of {self.evaluated} expectations failed: " + "; ".join(self.failures)


def build_expectations(policy: QualityPolicy, languages_known: bool = True) -> dict[str, list[Any]]:
    """Return the expectations of each table the suite checks: documents, sources, preparation.

    Every expectation is on a metric of the text (length, non-blank characters, PII finds, language), never
    on the text itself: what a failed check samples (ids, numbers) may appear in Data Docs and alerts.
    """
    import great_expectations.expectations as gxe

    documents = [
        gxe.ExpectTableRowCountToBeBetween(min_value=policy.min_documents),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        # A null or whitespace-only text has no visible characters.
        gxe.ExpectColumnValuesToBeBetween(column="visible_chars", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=policy.min_chars, max_value=policy.max_chars,
                                          mostly=policy.length_mostly),
        # The second pass: the preparation recipe's scrubber must have left no personal data or credentials.
        gxe.ExpectColumnValuesToBeBetween(column="pii_hits", min_value=0, max_value=policy.max_pii_hits),
    ]
    # "quantile q lies in [low, high]" is "a share q of the documents is at most high, 1 - q at least low"; the
    # mostly-form names the documents outside (GX's quantile expectation stores NumPy booleans it cannot save).
    for q, (low, high) in policy.length_quantiles.items():
        if high is not None and q > 0:
            documents.append(gxe.ExpectColumnValuesToBeBetween(column="chars", max_value=high, mostly=q))
        if low is not None and q < 1:
            documents.append(gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=low, mostly=round(1 - q, 6)))
    if policy.languages and languages_known:
        documents.append(gxe.ExpectColumnValuesToBeInSet(column="language", value_set=list(policy.languages),
                                                         mostly=policy.min_language_share))
    sources = []
    if policy.min_documents_per_source:
        sources.append(gxe.ExpectColumnValuesToBeBetween(column="documents", min_value=policy.min_documents_per_source))
    preparation = []
    if policy.max_near_duplicate_share < 1.0:
        preparation.append(gxe.ExpectColumnValuesToBeBetween(column="near_duplicate_share", min_value=0,
                                                             max_value=policy.max_near_duplicate_share))
    return {"documents": documents, "sources": sources, "preparation": preparation}


ID_COLUMNS = {"documents": "id", "sources": "source", "preparation": "step"}


def validate_frame(frame: Any, policy: QualityPolicy, sources: Any = None, preparation: Any = None,
                   docs_dir: Path | None = None) -> QualityReport:
    """Validate a corpus with the suite: ``frame`` has ``id`` and ``text`` (or its metrics), ``sources`` one row per
    source (``source``, ``documents``), ``preparation`` one row (``step``, ``near_duplicate_share``).

    With ``docs_dir`` the validation is also rendered there as Great Expectations Data Docs.
    """
    import pandas as pd

    if "text" in frame.columns:
        frame = frame.assign(**text_metrics(frame["text"])).drop(columns=["text"])
    if "language" not in frame.columns:
        frame = frame.assign(language="unknown")
    if sources is None:
        sources = frame.assign(source=frame["id"].astype(str).str.split("/").str[0]).groupby("source").size() \
            .rename("documents").reset_index()
    if preparation is None:
        preparation = pd.DataFrame({"step": ["near_dedup"], "near_duplicate_share": [0.0]})
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from nightshift.quality import data_docs

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        data_docs.add_site(context, docs_dir)
    source = context.data_sources.add_pandas(name="nightshift")
    tables = {"documents": frame, "sources": sources, "preparation": preparation}
    evaluated = failed = 0
    failures: list[str] = []
    skipped: list[str] = []
    success = True
    languages_known = not (frame["language"].astype(str) == "unknown").all()
    if policy.languages and not languages_known:
        skipped.append("language share: no document has a language (the preparation recipe has no language step)")
        log.warning("quality: %s", skipped[-1])
    for name, expectations in build_expectations(policy, languages_known).items():
        if not expectations:
            continue
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name=f"whole_{name}")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # Offending rows are named by their ids; document text never reaches a log, the UI or an alert.
        result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": [ID_COLUMNS[name]],
                         "partial_unexpected_count": 5}
        result = definition.run(batch_parameters={"dataframe": tables[name]}, result_format=result_format)
        failures += [f"{name}: {_describe_failure(r, ID_COLUMNS[name])}" for r in result.results if not r.success]
        success = success and bool(result.success)
        evaluated += int(result.statistics["evaluated_expectations"])
        failed += int(result.statistics["unsuccessful_expectations"])
    pages = data_docs.build(context, docs_dir) if docs_dir is not None else []
    report = QualityReport(success=success, evaluated=evaluated, failed=failed, failures=failures, data_docs=pages,
                           skipped=skipped)
    log.info("quality: %s", report.summary())
    return report


def text_metrics(texts: Any) -> dict[str, list[int]]:
    """Return per-text lengths, visible (non-blank) characters and second-pass PII finds.

    The second pass counts what the scrubber's own rules find plus what an independent detector finds
    (``prep.secrets``: detect-secrets and generic rules): rerunning the scrubber alone could only confirm it.
    """
    from nightshift.prep.pii import Scrubber
    from nightshift.prep.secrets import verify_many

    scrubber = Scrubber()
    texts = [text if isinstance(text, str) else "" for text in texts]
    chars, visible, pii = [], [], []
    for text, secrets in zip(texts, verify_many(texts), strict=True):
        chars.append(len(text))
        visible.append(len(text) - sum(map(text.count, (" ", "\n", "\t", "\r"))) if text.strip() else 0)
        pii.append(len(scrubber.find(text)) + len(secrets))
    return {"chars": chars, "visible_chars": visible, "pii_hits": pii}


def validate_corpus(corpus_path: Path, policy: QualityPolicy, sources: dict[str, int] | None = None,
                    near_duplicate_share: float = 0.0, docs_dir: Path | None = None) -> QualityReport:
    """Validate a corpus JSONL file against the suite, streaming it (only per-document metrics are held).

    The metrics are the ones the corpus profile sketches (length, language as preparation identified it, PII
    finds); ``sources`` are the documents each collected source brought in (one that brought none is listed).
    """
    import orjson
    import pandas as pd

    ids: list[str] = []
    languages: list[str] = []
    texts_metrics: dict[str, list[int]] = {"chars": [], "visible_chars": [], "pii_hits": []}
    batch_ids, batch_texts = [], []

    def flush() -> None:
        for key, values in text_metrics(batch_texts).items():
            texts_metrics[key] += values
        ids.extend(batch_ids)
        batch_ids.clear()
        batch_texts.clear()

    with corpus_path.open("rb") as fh:
        for line in fh:
            if line.strip():
                doc = orjson.loads(line)
                batch_ids.append(None if doc.get("id") is None else str(doc["id"]))
                batch_texts.append(doc.get("text"))
                prep = (doc.get("meta") or {}).get("prep") if isinstance(doc.get("meta"), dict) else None
                languages.append(str((prep or {}).get("language") or "unknown"))
                if len(batch_ids) >= 1024:
                    flush()
    flush()
    frame = pd.DataFrame({"id": pd.Series(ids, dtype=object), **{k: pd.Series(v, dtype="int64")
                                                                 for k, v in texts_metrics.items()}})
    frame["language"] = pd.Series(languages, dtype=object)
    counted = frame["id"].astype(str).str.split("/").str[0].value_counts().to_dict()
    source_frame = None
    if sources is not None:
        names = sorted(set(sources) | set(counted))
        source_frame = pd.DataFrame({"source": names, "documents": [int(counted.get(n, 0)) for n in names]})
    preparation = pd.DataFrame({"step": ["near_dedup"], "near_duplicate_share": [float(near_duplicate_share)]})
    return validate_frame(frame, policy, source_frame, preparation, docs_dir)


def _describe_failure(result: Any, id_column: str = "id") -> str:
    """Describe a failed expectation by its settings, counts and the ids of offending rows, never their text."""
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "regex")}
    outcome = result.result or {}
    detail = []
    if (result.exception_info or {}).get("raised_exception") or any(
            isinstance(v, dict) and v.get("raised_exception") for v in (result.exception_info or {}).values()):
        detail.append("could not be evaluated (see the task log)")
        log.error("expectation %s raised: %s", config.type, result.exception_info)
    observed = outcome.get("observed_value")
    if isinstance(observed, int | float):
        detail.append(f"observed {observed}")
    elif isinstance(observed, dict) and "quantiles" in observed:
        detail.append("observed " + ", ".join(f"q{q}={v}" for q, v in zip(observed["quantiles"], observed["values"],
                                                                          strict=False)))
    if outcome.get("unexpected_count"):
        ids = [_clip(row.get(id_column)) for row in (outcome.get("partial_unexpected_index_list") or [])[:5]]
        detail.append(f"{outcome['unexpected_count']} unexpected" + (f", ids {ids}" if ids else ""))
    return f"{config.type}({kwargs}) " + ", ".join(detail)


def _clip(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else f"{text[:width]}..."
