"""The preparation recipe (include/configs/prep.yaml): profiles of per-document steps, deduplication, executor.

A profile is an ordered list of per-document steps for one kind of content, in its own file
(include/configs/prep/<name>.yaml, holding ``steps:``): ``docs`` for technical documentation, ``web`` for web
prose, and any file a team adds. A source picks one with ``prep: <name>`` in sources.yaml; prep.yaml names the
default (``default_profile``). A prep.yaml with its own ``steps:`` still loads: they are the profile "default".

Every field is checked when the recipe is read; an error names the file and the field by its path in the file
(``prep/docs.yaml: steps[2].gopher_quality.min_doc_words``) and says what it must be.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import _type_problem, read_yaml_mapping
from nightshift.settings import CONFIG_DIR, SAMPLES_DIR

DEFAULT_RECIPE = CONFIG_DIR / "prep.yaml"
PROFILE_DIR = CONFIG_DIR / "prep"
"""Profile files, one per kind of content; each <name>.yaml is selectable by its name."""
LEGACY_PROFILE = "default"
"""The profile name of the steps a prep.yaml lists itself."""
PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
MEASURES = ("all", "prose")


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
    """Characters read from each document: enough to tell a language (py3langid reads them byte by byte in
    Python, so this bounds the step's cost per document)."""
    sample: str = "start"
    """start: the first ``sample_chars``; spread: sentence lines taken evenly from the whole document (the start
    of a manual page is often a synopsis or a title)."""
    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged as a reference page (see
    nightshift.prep.curate.DocumentCurator)."""

    def check(self, where: str) -> None:
        _measure(where, self)
        if self.sample not in ("start", "spread"):
            raise RecipeError(f"{where}.sample must be start or spread, got {self.sample!r}")
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
    alpha_words: str = "tokens"
    """What max_non_alpha_words_ratio counts: tokens (datatrove's: every punctuation mark is a word) or
    whitespace (the Gopher paper's whitespace-separated words, so ``git-log(1)`` is one word with a letter)."""
    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged as a reference page (see
    nightshift.prep.curate.DocumentCurator)."""

    def check(self, where: str) -> None:
        _measure(where, self)
        if self.alpha_words not in ("tokens", "whitespace"):
            raise RecipeError(f"{where}.alpha_words must be tokens or whitespace, got {self.alpha_words!r}")
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
    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged as a reference page (see
    nightshift.prep.curate.DocumentCurator)."""

    def check(self, where: str) -> None:
        _measure(where, self)
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
    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged as a reference page (see
    nightshift.prep.curate.DocumentCurator)."""

    def check(self, where: str) -> None:
        _measure(where, self)
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
    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged as a reference page (see
    nightshift.prep.curate.DocumentCurator)."""

    def check(self, where: str) -> None:
        _measure(where, self)
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
    """The whole preparation recipe: shared limits, deduplication and executor, and the profiles of steps."""

    limits: Limits = field(default_factory=Limits)
    steps: tuple[Step, ...] = ()
    """The default profile's steps."""
    dedup: Dedup = field(default_factory=Dedup)
    executor: Executor = field(default_factory=Executor)
    default_profile: str = LEGACY_PROFILE
    """The profile of a source that names none, and of the ``source`` Param's one-off source."""
    profiles: dict[str, tuple[Step, ...]] = field(default_factory=dict)
    """Every selectable profile: name -> its steps (the default profile's included)."""

    def __post_init__(self) -> None:
        if self.default_profile not in self.profiles:  # built from steps alone: they are the only profile
            object.__setattr__(self, "profiles", {**self.profiles, self.default_profile: self.steps})

    def step(self, name: str) -> Any | None:
        """Return the configuration of the named step in the default profile, or None when it does not run it."""
        return next((s.config for s in self.steps if s.name == name), None)

    def profile(self, name: str) -> PrepRecipe:
        """Return the recipe that runs the named profile's steps (and holds only that profile)."""
        if name not in self.profiles:
            raise RecipeError(f"no preparation profile {name!r}; known profiles: {sorted(self.profiles)}")
        steps = self.profiles[name]
        return dataclasses.replace(self, steps=steps, default_profile=name, profiles={name: steps})

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as data (every profile's steps inline): ``from_dict`` rebuilds it without files."""
        return {
            "limits": dataclasses.asdict(self.limits),
            "default_profile": self.default_profile,
            "profiles": {name: _steps_dict(steps) for name, steps in sorted(self.profiles.items())},
            "dedup": dataclasses.asdict(self.dedup),
            "executor": dataclasses.asdict(self.executor),
        }

    def digest(self) -> str:
        """Return a hash of everything that decides a document's verdict, in every profile (not where steps run)."""
        data = self.to_dict()
        data.pop("executor")
        sets: dict[str, str] = {}
        for steps in self.profiles.values():
            decon = next((s.config for s in steps if s.name == "decontaminate"), None)
            if decon is not None:
                for n in decon.sets:
                    path = decon.set_path(n)
                    sets[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        if sets:
            data["eval_sets"] = sets
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def load(cls, path: Path = DEFAULT_RECIPE) -> PrepRecipe:
        """Return the recipe in ``path`` with every profile file of the prep/ folder beside it."""
        path = Path(path)
        try:
            data = read_yaml_mapping(path)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        return cls.from_dict(data, path.name, path.parent / "prep")

    @classmethod
    def from_dict(cls, data: Any, source: str = "prep.yaml", folder: Path | None = PROFILE_DIR) -> PrepRecipe:
        """Return the recipe ``data`` describes; profiles named by file, or found in ``folder``, are read."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping with limits, default_profile, dedup and executor")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise RecipeError(f"{source}: unknown sections {unknown}; expected {', '.join(SECTIONS)}")
        profiles: dict[str, tuple[Step, ...]] = {}
        if "steps" in data or "default_profile" not in data:  # the recipe's own steps, as before profiles
            profiles[LEGACY_PROFILE] = _parse_steps(data.get("steps"), source)
        default = data.get("default_profile", LEGACY_PROFILE)
        if not isinstance(default, str) or not PROFILE_NAME.fullmatch(default):
            raise RecipeError(f"{source}: default_profile must be a profile name (lower-case letters, digits, "
                              f"'-', '_'), got {str(default)[:60]!r}")
        named = data.get("profiles") or {}
        if not isinstance(named, dict):
            raise RecipeError(f"{source}: profiles must map profile names to files (docs: prep/docs.yaml)")
        for name, entry in named.items():
            where = f"{source}: profiles.{name}"
            if not isinstance(name, str) or not PROFILE_NAME.fullmatch(name):
                raise RecipeError(f"{source}: profiles: {str(name)[:60]!r} is not a profile name (lower-case "
                                  "letters, digits, '-', '_')")
            if isinstance(entry, str):
                profiles[name] = _read_profile(_profile_path(entry), where)
            elif isinstance(entry, list):
                profiles[name] = _parse_steps(entry, where)
            else:
                raise RecipeError(f"{where} must be a profile file (prep/{name}.yaml) or a list of steps")
        found = sorted(folder.glob("*.yaml")) if folder is not None and folder.is_dir() else []
        if default not in profiles and not any(f.stem == default for f in found):
            found.append((folder or PROFILE_DIR) / f"{default}.yaml")
        for path in found:
            if path.stem not in profiles and PROFILE_NAME.fullmatch(path.stem):
                if not path.is_file():
                    raise RecipeError(f"{source}: default_profile {default!r} has no file {path.parent.name}/"
                                      f"{path.name}; known profiles: {sorted(profiles)}")
                profiles[path.stem] = _read_profile(path, f"{path.parent.name}/{path.name}")
        return cls(
            limits=_build(Limits, data.get("limits"), f"{source}: limits"),
            steps=profiles[default],
            dedup=_build(Dedup, data.get("dedup"), f"{source}: dedup"),
            executor=_build(Executor, data.get("executor"), f"{source}: executor"),
            default_profile=default,
            profiles=profiles,
        )


SECTIONS = ("limits", "steps", "default_profile", "profiles", "dedup", "executor")


def _steps_dict(steps: tuple[Step, ...]) -> list[dict[str, Any]]:
    return [{s.name: dataclasses.asdict(s.config)} for s in steps]


def _profile_path(entry: str) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else CONFIG_DIR / path


def _read_profile(path: Path, where: str) -> tuple[Step, ...]:
    """Return the steps of one profile file, which holds ``steps:`` and nothing else."""
    try:
        data = read_yaml_mapping(path)
    except FileNotFoundError:
        raise RecipeError(f"{where}: no profile file at {str(path)[:200]!r}") from None
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    unknown = sorted(str(k) for k in set(data) - {"steps"})
    if unknown:
        raise RecipeError(f"{where}: unknown sections {unknown}; a profile file holds only steps")
    return _parse_steps(data.get("steps"), where)


def _parse_steps(raw_steps: Any, source: str) -> tuple[Step, ...]:
    """Return the validated steps of one profile; errors name ``source`` and the step's position."""
    raw_steps = raw_steps or []
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
    return tuple(steps)


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


def _measure(where: str, config: Any) -> None:
    if config.measure not in MEASURES:
        raise RecipeError(f"{where}.measure must be all or prose, got {config.measure!r}")
    if not isinstance(config.min_prose_words, int) or config.min_prose_words < 0:
        raise RecipeError(f"{where}.min_prose_words must be an integer >= 0, got {config.min_prose_words!r}")


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
