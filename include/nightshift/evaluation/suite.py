"""The evaluation suite (include/configs/evaluation.yaml): which sets, which metrics, generation and judge settings.

Candidate and champion always run through one suite: the same golden items, the same greedy generation
settings, the same judge and the same bootstrap. Errors name the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.evaluation.metrics import (
    CATALOG,
    FORMAT_KEYS,
    MAX_PATTERN_CHARS,
    compile_pattern,
    known_language,
    skeleton,
)
from nightshift.settings import SAMPLES_DIR

EXPECTATIONS = ("answer", "refuse")
MAX_GOLDEN_ITEMS = 10_000
MAX_SECRETS = 20
"""Strings one golden item may forbid (``must_not_contain``)."""
SECRET_CHARS = (4, 200)
"""Shortest and longest forbidden string, counted in the letters and digits it is compared by (metrics.leaks):
a shorter one would be found in harmless answers."""


@dataclass(frozen=True)
class GoldenItem:
    question: str
    answer: str
    """The reference answer (for an item to refuse: what a good refusal says)."""
    expect: str = "answer"
    """``answer`` or ``refuse``: whether a good model answers the question or declines it."""
    id: str = ""
    must_not_contain: tuple[str, ...] = ()
    """Planted secrets or private data that must never appear in an answer; one that does is a leak, never a
    refusal. Never logged."""
    format: dict[str, Any] = field(default_factory=dict, hash=False)
    """What the answer's form must be, beside its content: ``language`` (ISO 639-1; overrides the suite's
    ``answer_language``), ``max_words``, ``pattern`` (a regular expression the answer must contain a match of,
    case ignored). Counted by ``golden.format_rate``: the items a prompt change breaks first."""
    sources: tuple[str, ...] = ()
    """Ids of the corpus documents that hold the answer (``samples/guides/visiting.md``): retrieval's recall@k and
    the comparison with and without retrieval use the items that name them."""


def load_golden(path: Path) -> list[GoldenItem]:
    """Return the golden items of a JSONL file: ``question``, ``answer``, optional ``expect``, ``id`` and
    ``must_not_contain``."""
    items = []
    name = Path(path).name
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{name}:{lineno}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not isinstance(record.get("answer"), str):
            raise ValueError(f"{name}:{lineno}: golden items need string fields 'question' and 'answer'")
        expect = record.get("expect", "answer")
        if expect not in EXPECTATIONS:
            raise ValueError(f"{name}:{lineno}: expect must be one of {list(EXPECTATIONS)}")
        secrets = _secrets(f"{name}:{lineno}", record.get("must_not_contain", []))
        form = _format(f"{name}:{lineno}", record.get("format", {}))
        sources = record.get("sources", [])
        if not isinstance(sources, list) or len(sources) > 32 or not all(
                isinstance(s, str) and 0 < len(s) <= 1024 for s in sources):
            raise ValueError(f"{name}:{lineno}: sources must be a list of at most 32 document ids")
        items.append(GoldenItem(record["question"], record["answer"], expect, str(record.get("id") or f"q{lineno}"),
                                secrets, form, tuple(sources)))
        if len(items) > MAX_GOLDEN_ITEMS:
            raise ValueError(f"{name}: more than {MAX_GOLDEN_ITEMS} golden items")
    if not items:
        raise ValueError(f"{name} holds no golden items")
    if len({i.id for i in items}) != len(items):
        raise ValueError(f"{name}: golden item ids must be unique")
    return items


def _secrets(where: str, value: Any) -> tuple[str, ...]:
    """Return the validated ``must_not_contain`` strings of one golden item (the strings are never echoed)."""
    low, high = SECRET_CHARS
    if not isinstance(value, list) or len(value) > MAX_SECRETS or not all(
            isinstance(v, str) and low <= len(skeleton(v)[0]) and len(" ".join(v.split())) <= high for v in value):
        raise ValueError(f"{where}: must_not_contain must be a list of at most {MAX_SECRETS} strings of {low} to "
                         f"{high} characters, at least {low} of them letters or digits (leaks are found by those)")
    return tuple(value)


def _format(where: str, value: Any) -> dict[str, Any]:
    """Return the validated ``format`` of one golden item."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: format must be a mapping of {list(FORMAT_KEYS)}")
    unknown = sorted(str(k) for k in set(value) - set(FORMAT_KEYS))
    if unknown:
        raise ValueError(f"{where}: format: unknown fields {unknown}; known: {list(FORMAT_KEYS)}")
    out: dict[str, Any] = {}
    if "language" in value:
        if value["language"] is not None and not (isinstance(value["language"], str)
                                                  and known_language(value["language"])):
            raise ValueError(f"{where}: format.language must be an ISO 639-1 code py3langid knows (en, fr, de, ...) "
                             "or null (no language check)")
        out["language"] = value["language"]
    if "max_words" in value:
        words = value["max_words"]
        if not isinstance(words, int) or isinstance(words, bool) or not 1 <= words <= 1000:
            raise ValueError(f"{where}: format.max_words must be an integer from 1 to 1000")
        out["max_words"] = words
    if "pattern" in value:
        pattern = value["pattern"]
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
            raise ValueError(f"{where}: format.pattern must be a regular expression of 1 to {MAX_PATTERN_CHARS} "
                             "characters")
        try:
            compile_pattern(pattern)
        except Exception:  # noqa: BLE001 - regex raises its own error class for every kind of bad pattern
            raise ValueError(f"{where}: format.pattern is not a valid regular expression") from None
        out["pattern"] = pattern
    return out


@dataclass(frozen=True)
class JudgeSettings:
    connection: str = "nightshift_judge"
    """Airflow connection of an OpenAI-compatible endpoint; when it is not defined the suite runs without a judge."""
    model: str | None = None
    """Judge model; empty: the connection's extra ``model``."""
    timeout_s: float = 60.0
    max_attempts: int = 2
    concurrency: int = 4
    max_tokens: int = 200


@dataclass(frozen=True)
class BootstrapSettings:
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 20261201


@dataclass(frozen=True)
class EvaluationSuite:
    golden_set: Path
    metrics: tuple[str, ...]
    max_new_tokens: int = 48
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    refusal_markers: tuple[str, ...] = ()
    changed_examples: int = 6
    """Examples shown side by side in the report: those whose scores changed most."""
    answer_language: str | None = None
    """ISO 639-1 code every answer is expected in (``golden.format_rate``); an item's ``format.language`` overrides
    it. None: no language check."""

    def format_of(self, item: GoldenItem) -> dict[str, Any]:
        """Return what an item's answer must keep to: the suite's language, with the item's format over it."""
        spec = {"language": self.answer_language} if self.answer_language else {}
        spec.update(item.format)
        return {k: v for k, v in spec.items() if v is not None}

    @property
    def uses_judge(self) -> bool:
        return any(CATALOG[m].judge for m in self.metrics)

    def golden(self) -> list[GoldenItem]:
        return load_golden(self.golden_set)

    @classmethod
    def load(cls, path: Path) -> EvaluationSuite:
        path = Path(path)
        data = read_yaml_mapping(path)
        where = path.name

        def section(name: str, allowed: set[str]) -> dict[str, Any]:
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name} must be a mapping")
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise ValueError(f"{where}: unknown {name} fields {unknown}")
            return value

        known = {"golden_set", "metrics", "generation", "judge", "bootstrap", "refusal_markers", "report",
                 "answer_language"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        metrics = data.get("metrics")
        if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"{where}: metrics must be a non-empty list of metric names")
        for m in metrics:
            if m not in CATALOG:
                raise ValueError(f"{where}: metrics: unknown metric {m[:60]!r}; known: {sorted(CATALOG)}")
        golden = data.get("golden_set", "golden_qa.jsonl")
        if not isinstance(golden, str) or not golden:
            raise ValueError(f"{where}: golden_set must be a file name in include/samples or an absolute path")
        golden_path = Path(golden) if Path(golden).is_absolute() else SAMPLES_DIR / golden
        if not golden_path.is_file():
            raise ValueError(f"{where}: golden_set {golden_path} does not exist")
        generation = section("generation", {"max_new_tokens"})
        judge = section("judge", {"connection", "model", "timeout_s", "max_attempts", "concurrency", "max_tokens"})
        boot = section("bootstrap", {"resamples", "confidence", "seed"})
        report = section("report", {"changed_examples"})
        markers = data.get("refusal_markers") or []
        if not isinstance(markers, list) or not all(isinstance(m, str) and m.strip() for m in markers):
            raise ValueError(f"{where}: refusal_markers must be a list of phrases")
        suite = cls(
            golden_set=golden_path, metrics=tuple(dict.fromkeys(metrics)),
            max_new_tokens=_int(where, "generation.max_new_tokens", generation.get("max_new_tokens", 48), 1, 4096),
            judge=JudgeSettings(
                connection=_str(where, "judge.connection", judge.get("connection", "nightshift_judge")),
                model=judge.get("model") and _str(where, "judge.model", judge["model"]),
                timeout_s=_num(where, "judge.timeout_s", judge.get("timeout_s", 60.0), 0.1, 3600),
                max_attempts=_int(where, "judge.max_attempts", judge.get("max_attempts", 2), 1, 10),
                concurrency=_int(where, "judge.concurrency", judge.get("concurrency", 4), 1, 64),
                max_tokens=_int(where, "judge.max_tokens", judge.get("max_tokens", 200), 16, 4096),
            ),
            bootstrap=BootstrapSettings(
                resamples=_int(where, "bootstrap.resamples", boot.get("resamples", 2000), 100, 1_000_000),
                confidence=_num(where, "bootstrap.confidence", boot.get("confidence", 0.95), 0.5, 0.999),
                seed=_int(where, "bootstrap.seed", boot.get("seed", 20261201), 0, 2**32 - 1),
            ),
            refusal_markers=tuple(m.strip().lower() for m in markers),
            changed_examples=_int(where, "report.changed_examples", report.get("changed_examples", 6), 0, 100),
            answer_language=_language(where, data.get("answer_language")),
        )
        if "golden.refusal_rate" in suite.metrics and not suite.refusal_markers:
            raise ValueError(f"{where}: golden.refusal_rate needs refusal_markers (phrases that mark a refusal)")
        return suite


def _language(where: str, value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and known_language(value)):
        raise ValueError(f"{where}: answer_language must be an ISO 639-1 code py3langid knows (en, fr, de, ...) or "
                         "null")
    return value


def _int(where: str, name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be an integer from {low} to {high}")
    return value


def _num(where: str, name: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be a number from {low} to {high}")
    return float(value)


def _str(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 250:
        raise ValueError(f"{where}: {name} must be a non-empty string")
    return value.strip()
