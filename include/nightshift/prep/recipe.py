"""The preparation recipe (include/configs/prep.yaml): profiles of per-document steps, deduplication, executor.

A profile is an ordered list of per-document steps for one kind of content, in its own file
(include/configs/prep/<name>.yaml, holding ``steps:``): ``docs`` for technical documentation, ``web`` for web
prose, and any file a team adds. A source picks one with ``prep: <name>`` in sources.yaml; prep.yaml names the
default (``default_profile``). A prep.yaml with its own ``steps:`` still loads: they are the profile "default".

Every field is checked when the recipe is read; an error names the file and the field by its path in the file
(``prep/docs.yaml: steps[2].gopher_quality.min_doc_words``) and says what it must be. A step's settings are its
class's ``Config`` (nightshift.prep.steps maps each name a recipe may use to its class); the limits,
deduplication and executor sections are defined here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping
from nightshift.prep.step_base import RecipeError, build, positive
from nightshift.prep.steps import STEPS
from nightshift.settings import CONFIG_DIR

DEFAULT_RECIPE = CONFIG_DIR / "prep.yaml"
PROFILE_DIR = CONFIG_DIR / "prep"
"""Profile files, one per kind of content; each <name>.yaml is selectable by its name."""
LEGACY_PROFILE = "default"
"""The profile name of the steps a prep.yaml lists itself."""
PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")


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
        positive(where, "max_raw_chars", self.max_raw_chars)
        positive(where, "min_chars", self.min_chars)
        if self.max_chars < self.min_chars:
            raise RecipeError(f"{where}.max_chars must be >= min_chars ({self.min_chars}), got {self.max_chars}")


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
        positive(where, "ngram", self.ngram)
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
            limits=build(Limits, data.get("limits"), f"{source}: limits"),
            steps=profiles[default],
            dedup=build(Dedup, data.get("dedup"), f"{source}: dedup"),
            executor=build(Executor, data.get("executor"), f"{source}: executor"),
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
        steps.append(Step(name, build(STEPS[name].Config, settings, f"{where}.{name}")))
    return tuple(steps)
