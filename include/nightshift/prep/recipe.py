"""The preparation recipe (include/configs/prep.yaml): ordered per-document steps, deduplication, executor.

Every field is checked when the recipe is read; an error names the field by its path in the file
(``steps[2].gopher_quality.min_doc_words``) and says what it must be.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import _type_problem, read_yaml_mapping
from nightshift.settings import CONFIG_DIR, SAMPLES_DIR

DEFAULT_RECIPE = CONFIG_DIR / "prep.yaml"


class RecipeError(ValueError):
    """The recipe file is not valid; the message names the field and what it must be."""


@dataclass(frozen=True)
class Limits:
    """Per-document bounds: a document outside them is dropped with a counted reason, the night goes on."""

    max_raw_chars: int = 8_000_000
    """Longest raw document (HTML or text) worth extracting; longer ones are dropped before any work."""
    min_chars: int = 20
    """Shortest document worth training on, after cleaning."""
    max_chars: int = 200_000
    """Longest document after cleaning; longer ones are usually dumps or concatenation errors."""

    def check(self, where: str) -> None:
        _positive(where, "max_raw_chars", self.max_raw_chars)
        _positive(where, "min_chars", self.min_chars)
        if self.max_chars < self.min_chars:
            raise RecipeError(f"{where}.max_chars must be >= min_chars ({self.min_chars}), got {self.max_chars}")


@dataclass(frozen=True)
class Language:
    """Language identification with py3langid (its model ships in the wheel)."""

    keep: tuple[str, ...] = ("en",)
    """ISO 639-1 codes of the languages to keep."""
    min_confidence: float = 0.5
    """Documents whose most likely kept language has a lower probability are dropped."""
    sample_chars: int = 400
    """Characters read from the start of each document: enough to tell a language (py3langid reads them
    byte by byte in Python, so this bounds the step's cost per document)."""

    def check(self, where: str) -> None:
        if not self.keep:
            raise RecipeError(f"{where}.keep must list at least one language code")
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        known = set(LanguageIdentifier.from_model_file(MODEL_FILE).labels)
        unknown = sorted(set(self.keep) - known)
        if unknown:
            raise RecipeError(f"{where}.keep: unknown language codes {unknown} (py3langid knows ISO 639-1 codes)")
        _fraction(where, "min_confidence", self.min_confidence)
        _positive(where, "sample_chars", self.sample_chars)


@dataclass(frozen=True)
class GopherQuality:
    """Gopher quality rules (Rae et al. 2021, table A1), as datatrove's GopherQualityFilter."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2

    def check(self, where: str) -> None:
        _fractions(where, self, "max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                   "max_non_alpha_words_ratio")


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher repetition rules: duplicated lines, paragraphs and n-grams, as datatrove's GopherRepetitionFilter."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> largest share of characters the most frequent n-gram may cover."""
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> largest share of characters that repeated n-grams may cover."""

    def check(self, where: str) -> None:
        _fractions(where, self, "dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac")
        for name in ("top_n_grams", "dup_n_grams"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(
                    isinstance(n, int) and 1 <= n <= 50 and isinstance(v, int | float) and 0 <= v <= 1
                    for n, v in table.items()):
                raise RecipeError(f"{where}.{name} must map n-gram sizes (1..50) to fractions in [0, 1]")


@dataclass(frozen=True)
class C4Quality:
    """C4 rules (Raffel et al. 2020) as datatrove's C4QualityFilter; line removal is off unless asked for."""

    split_paragraph: bool = True
    remove_citations: bool = False
    filter_no_terminal_punct: bool = False
    """True removes every line without terminal punctuation (headings, list items): it alters text."""
    min_num_sentences: int = 1
    min_words_per_line: int = -1
    """-1 keeps lines of any length; C4 drops lines under 3 words (this alters text)."""
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def check(self, where: str) -> None:
        _positive(where, "max_word_length", self.max_word_length)


@dataclass(frozen=True)
class FineWebQuality:
    """FineWeb rules (Penedo et al. 2024) as datatrove's FineWebQualityFilter."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def check(self, where: str) -> None:
        _fractions(where, self, "line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio")


PII_TYPES = ("email", "phone", "ip_address", "credit_card", "iban", "secret")


@dataclass(frozen=True)
class Pii:
    """Scrub personal data and credentials, replacing each find by a typed placeholder such as ``<EMAIL>``."""

    types: tuple[str, ...] = PII_TYPES
    """Kinds to scrub: email, phone, ip_address, credit_card (Luhn-checked), iban (mod-97), secret (credentials)."""

    def check(self, where: str) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown or not self.types:
            raise RecipeError(f"{where}.types must be a non-empty subset of {list(PII_TYPES)}; unknown {unknown}")


@dataclass(frozen=True)
class Decontaminate:
    """Find documents that share long word n-grams with evaluation sets (GPT-3's 13-gram rule)."""

    sets: dict[str, str] = field(default_factory=lambda: {"golden": "samples:golden_qa.jsonl"})
    """name -> JSONL file of evaluation items (every string field is read); ``samples:`` is the bundled folder."""
    ngram: int = 13
    """Words in a shared n-gram that counts as contamination."""
    min_item_words: int = 8
    """Items shorter than ``ngram`` words are matched whole when they have at least this many words."""
    action: str = "drop"
    """drop: remove contaminated documents; report: keep them and count them."""

    def check(self, where: str) -> None:
        if self.action not in ("drop", "report"):
            raise RecipeError(f"{where}.action must be drop or report, got {self.action!r}")
        _positive(where, "ngram", self.ngram)
        _positive(where, "min_item_words", self.min_item_words)
        if not isinstance(self.sets, dict) or not all(isinstance(v, str) for v in self.sets.values()):
            raise RecipeError(f"{where}.sets must map set names to JSONL paths")
        for name in self.sets:
            if not self.set_path(name).is_file():
                raise RecipeError(f"{where}.sets.{name}: no file at {self.sets[name]!r}")

    def set_path(self, name: str) -> Path:
        value = self.sets[name]
        if value.startswith("samples:"):
            return SAMPLES_DIR / value.removeprefix("samples:")
        path = Path(value)
        return path if path.is_absolute() else CONFIG_DIR / path


@dataclass(frozen=True)
class Dedup:
    """Exact and near-duplicate removal over the whole night; one document of every cluster is kept."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    """Jaccard similarity of word-shingle sets at and above which two documents are duplicates."""
    ngram: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    seed: int = 1

    def check(self, where: str) -> None:
        if not 0.3 <= self.threshold < 1.0:
            raise RecipeError(f"{where}.threshold must be in [0.3, 1), got {self.threshold}")
        _positive(where, "ngram", self.ngram)
        if not 16 <= self.num_perm <= 1024:
            raise RecipeError(f"{where}.num_perm must be in 16..1024, got {self.num_perm}")


@dataclass(frozen=True)
class Executor:
    """Where the per-document steps run: datatrove's executors (local processes, Slurm or Ray)."""

    kind: str = "local"
    """local (processes on this machine), slurm or ray."""
    tasks: int = 0
    """Shards of the night's documents; 0 = one per worker."""
    workers: int = 0
    """Processes at once on this machine; 0 = one per CPU core. Ignored by slurm and ray."""
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to datatrove's SlurmPipelineExecutor / RayPipelineExecutor (partition, time, cpus_per_task...)."""

    def check(self, where: str) -> None:
        if self.kind not in ("local", "slurm", "ray"):
            raise RecipeError(f"{where}.kind must be local, slurm or ray, got {self.kind!r}")
        if self.tasks < 0 or self.workers < 0:
            raise RecipeError(f"{where}.tasks and workers must be >= 0")
        if not isinstance(self.options, dict):
            raise RecipeError(f"{where}.options must be a mapping")
        if self.kind == "slurm" and not self.options.get("partition"):
            raise RecipeError(f"{where}.options.partition is required for slurm (the Slurm partition to submit to)")
        if self.kind != "local" and self.options:
            import inspect

            from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

            executor = SlurmPipelineExecutor if self.kind == "slurm" else RayPipelineExecutor
            allowed = set(inspect.signature(executor.__init__).parameters) - {
                "self", "pipeline", "tasks", "logging_dir", "depends"}
            unknown = sorted(set(self.options) - allowed)
            if unknown:
                raise RecipeError(f"{where}.options: {executor.__name__} has no options {unknown}")


STEPS: dict[str, type] = {
    "language": Language, "gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition,
    "c4_quality": C4Quality, "fineweb_quality": FineWebQuality, "pii": Pii, "decontaminate": Decontaminate,
}


@dataclass(frozen=True)
class Step:
    name: str
    config: Any


@dataclass(frozen=True)
class PrepRecipe:
    """The whole preparation recipe."""

    limits: Limits = field(default_factory=Limits)
    steps: tuple[Step, ...] = ()
    dedup: Dedup = field(default_factory=Dedup)
    executor: Executor = field(default_factory=Executor)

    def step(self, name: str) -> Any | None:
        """Return the configuration of the named step, or None when the recipe does not run it."""
        return next((s.config for s in self.steps if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "limits": dataclasses.asdict(self.limits),
            "steps": [{s.name: dataclasses.asdict(s.config)} for s in self.steps],
            "dedup": dataclasses.asdict(self.dedup),
            "executor": dataclasses.asdict(self.executor),
        }

    def digest(self) -> str:
        """Return a hash of everything that decides a document's verdict (not where the steps run)."""
        data = self.to_dict()
        data.pop("executor")
        decon = self.step("decontaminate")
        if decon is not None:
            data["eval_sets"] = {n: hashlib.sha256(decon.set_path(n).read_bytes()).hexdigest() for n in decon.sets}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def load(cls, path: Path = DEFAULT_RECIPE) -> PrepRecipe:
        path = Path(path)
        try:
            data = read_yaml_mapping(path)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        return cls.from_dict(data, path.name)

    @classmethod
    def from_dict(cls, data: Any, source: str = "prep.yaml") -> PrepRecipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping with limits, steps, dedup and executor")
        unknown = sorted(set(data) - {"limits", "steps", "dedup", "executor"})
        if unknown:
            raise RecipeError(f"{source}: unknown sections {unknown}; expected limits, steps, dedup, executor")
        raw_steps = data.get("steps") or []
        if not isinstance(raw_steps, list):
            raise RecipeError(f"{source}: steps must be a list of one-key mappings, e.g. '- language: {{keep: [en]}}'")
        steps, seen = [], set()
        for i, entry in enumerate(raw_steps):
            where = f"{source}: steps[{i}]"
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise RecipeError(f"{where} must be one step name with its settings, e.g. '- pii: {{}}'")
            (name, settings), = entry.items()
            if name not in STEPS:
                raise RecipeError(f"{where}: unknown step {name!r}; known steps: {sorted(STEPS)}")
            if name in seen:
                raise RecipeError(f"{where}: step {name!r} appears twice")
            seen.add(name)
            steps.append(Step(name, _build(STEPS[name], settings, f"{where}.{name}")))
        recipe = cls(
            limits=_build(Limits, data.get("limits"), f"{source}: limits"),
            steps=tuple(steps),
            dedup=_build(Dedup, data.get("dedup"), f"{source}: dedup"),
            executor=_build(Executor, data.get("executor"), f"{source}: executor"),
        )
        return recipe


def _build(cls: type, settings: Any, where: str) -> Any:
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise RecipeError(f"{where} must be a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(settings) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown settings {unknown}; known: {sorted(fields)}")
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in settings.items():
        problem = _type_problem(hints.get(name), value)
        if problem:
            raise RecipeError(f"{where}.{name} must be {problem}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{where}.{name} must be a finite number")
        if typing.get_origin(hints.get(name)) is dict and typing.get_args(hints.get(name))[:1] == (int,) and \
                isinstance(value, dict):  # JSON (XCom, task arguments) turns integer keys into text
            value = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        if typing.get_origin(hints.get(name)) is tuple:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise RecipeError(f"{where}.{name} must be a list of text values")
            value = tuple(value)
        values[name] = value
    obj = cls(**values)
    obj.check(where)
    return obj


def _positive(where: str, name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise RecipeError(f"{where}.{name} must be a positive integer, got {value!r}")


def _fractions(where: str, config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) is not None:
            _fraction(where, name, getattr(config, name))


def _fraction(where: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"{where}.{name} must be a fraction in [0, 1], got {value}")
