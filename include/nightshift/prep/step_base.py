"""The shape of a preparation step, as datatrove's ``BaseFilter``: one class per recipe step, one decide method.

A step class names itself (``name``, the key in a recipe's ``steps:``), carries its settings as a dataclass
(``Config``, checked when the recipe is read; an error names the field by its path in the file) and decides
one document at a time (``decide``: the reason to drop it, or None to keep it; a step that rewrites text, such
as PII scrubbing, sets ``doc.text``). This base does the rest, the same for every step: a step that raises drops
the document with ``step_failed:<error>`` (the night goes on), a step that leaves no text drops it with
``empty_after_step``, drops are counted by reason, time is measured, and ``measure: prose`` judges the prose
part of a document (see ``Measured``). nightshift.prep.steps maps recipe names to these classes.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from nightshift import configs
from nightshift.prep.shards import Outcome

MEASURES = ("all", "prose")
DESCRIPTION_WORDS = 3
"""Prose words that make a page of code or tables a reference page (its one-line description) rather than junk."""


class RecipeError(ValueError):
    """The recipe file is not valid; the message names the field and what it must be."""


@dataclass
class Candidate:
    """One document as the steps see it: its id, its current text, and the outcome the steps fill in."""

    id: str
    text: str
    outcome: Outcome
    _prose: tuple[str, str, int] | None = None

    def prose(self) -> tuple[str, int]:
        """Return the prose part of the current text and its word count, computed once per text."""
        if self._prose is None or self._prose[0] is not self.text:
            from nightshift.prep.prose import prose_part

            prose = prose_part(self.text)
            self._prose = (self.text, prose, len(prose.split()))
        return self._prose[1], self._prose[2]


@dataclass(frozen=True)
class Measured:
    """Settings of a step that may judge a document's prose only; the kept text is the whole document."""

    measure: str = "all"
    """all: judge the whole text; prose: judge its prose only (code blocks, tables and signature lines left out,
    see nightshift.prep.prose). The kept text is the whole document either way."""
    min_prose_words: int = 20
    """With measure: prose, a document with fewer prose words is judged by its size instead: a reference page
    (at least ``DESCRIPTION_WORDS`` prose words, this many words in all, the rest reading as code) passes,
    anything else is judged on its whole text."""

    def check(self, where: str) -> None:
        if self.measure not in MEASURES:
            raise RecipeError(f"{where}.measure must be all or prose, got {self.measure!r}")
        if not isinstance(self.min_prose_words, int) or self.min_prose_words < 0:
            raise RecipeError(f"{where}.min_prose_words must be an integer >= 0, got {self.min_prose_words!r}")


class PrepStep:
    """Base of every per-document preparation step: subclasses set ``name`` and ``Config`` and write ``decide``."""

    name: ClassVar[str]
    """The step's key in a recipe (``- language: {keep: [en]}``)."""
    Config: ClassVar[type]
    """Its settings: a frozen dataclass, one docstring under each field, checked by ``check(where)``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.dropped: Counter[str] = Counter()
        """Documents dropped by reason, in this process (the night's report counts the published outcomes)."""
        self.seconds = 0.0

    def decide(self, doc: Candidate) -> str | None:
        """Return why to drop the document, or None to keep it; may rewrite ``doc.text`` or fill ``doc.outcome``."""
        raise NotImplementedError

    def decide_many(self, docs: list[Candidate]) -> list[str | None]:
        """Return the verdicts of several documents; steps that work faster on many texts at once override it."""
        return [self._judged(doc) for doc in docs]

    def run(self, docs: list[Candidate]) -> list[Candidate]:
        """Decide the documents, record the drops in their outcomes, and return the documents still kept."""
        started = time.perf_counter()
        try:
            verdicts = self.decide_many(docs)
        except Exception as exc:  # noqa: BLE001 - a batch step's failure drops its documents, not the night
            verdicts = [f"step_failed:{type(exc).__name__}"] * len(docs)
        kept = []
        for doc, reason in zip(docs, verdicts, strict=True):
            if reason is None and not doc.text.strip():
                reason = "empty_after_step"
            if reason is None:
                kept.append(doc)
            else:
                doc.outcome.step, doc.outcome.reason = self.name, reason
                self.dropped[reason] += 1
        self.seconds += time.perf_counter() - started
        return kept

    def _judged(self, doc: Candidate) -> str | None:
        """Return one document's verdict, judging its prose when the step's ``measure`` says so."""
        try:
            if getattr(self.config, "measure", "all") != "prose":
                return self.decide(doc)
            prose, words = doc.prose()
            text = doc.text
            if words >= self.config.min_prose_words:
                judged = prose
            elif (words >= DESCRIPTION_WORDS and len(text.split()) >= self.config.min_prose_words
                  and reads_as_code(text, prose)):
                return None  # a reference page: nothing of prose to judge
            else:
                judged = text
            view = Candidate(doc.id, judged, doc.outcome)
            reason = self.decide(view)
            return reason  # judging the prose never changes the kept text
        except Exception as exc:  # noqa: BLE001 - one document's failure is its own drop reason
            return f"step_failed:{type(exc).__name__}"


# Characters that code, data and markup use and sentences, keyword spam and gibberish rarely do; links do not
# count (link spam is full of them).
_URL = re.compile(r"\S{0,200}(?:://|www\.)\S{0,2000}")
_CODE_MARKS = frozenset("=(){}[];<>/\\_:@*&^~`\"'")


def reads_as_code(text: str, prose: str) -> bool:
    """Return whether the part of ``text`` that is not prose reads as code: most of its lines hold a mark of code
    (``=``, brackets, ``/``, ``_``, quotes...) and at most a third of them repeat another.

    Spam, gibberish, filler or boilerplate put in a code block or a table, or pushed out of the prose by
    symbols, do not; they are judged on their whole text.
    """
    prose_lines = set(prose.splitlines())
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and line not in prose_lines and not line.lstrip().startswith("```")]
    lines = [line.strip("|").strip() for line in lines if set(line) - set("|-: ")]  # table rules carry nothing
    if not lines:
        return False
    marked = sum(1 for line in lines if _CODE_MARKS.intersection(_URL.sub(" ", line)))
    repeated = len(lines) - len(set(lines))
    return marked >= 0.5 * len(lines) and repeated <= len(lines) / 3


def build(cls: type, settings: Any, where: str) -> Any:
    """Return ``cls`` built from a recipe's settings mapping, every value type-checked and ``check(where)`` run."""
    return configs.build(cls, settings, where, RecipeError)


def positive(where: str, name: str, value: int) -> None:
    """Raise RecipeError unless ``value`` is an integer >= 1."""
    configs.positive(where, name, value, RecipeError)


def fractions(where: str, config: Any, *names: str) -> None:
    """Raise RecipeError unless each named setting is None or a fraction in [0, 1]."""
    for name in names:
        if getattr(config, name) is not None:
            fraction(where, name, getattr(config, name))


def fraction(where: str, name: str, value: float) -> None:
    """Raise RecipeError unless ``value`` is in [0, 1]."""
    configs.fraction(where, name, value, RecipeError)
