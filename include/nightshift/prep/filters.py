"""The quality filter steps of a recipe: Gopher quality and repetition, C4 and FineWeb, each run by datatrove's
own filter (nightshift.prep.heuristics replaces only their measured bottlenecks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nightshift.prep.step_base import Candidate, Measured, PrepStep, RecipeError, fractions, positive

MEASURE_SETTINGS = ("measure", "min_prose_words")
"""Settings that say what text a step judges (nightshift.prep.step_base), not how datatrove's filter judges it."""


@dataclass(frozen=True)
class GopherQuality(Measured):
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

    def check(self, where: str) -> None:
        super().check(where)
        if self.alpha_words not in ("tokens", "whitespace"):
            raise RecipeError(f"{where}.alpha_words must be tokens or whitespace, got {self.alpha_words!r}")
        fractions(where, self, "max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                   "max_non_alpha_words_ratio")


@dataclass(frozen=True)
class GopherRepetition(Measured):
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
        super().check(where)
        fractions(where, self, "dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac")
        for name in ("top_n_grams", "dup_n_grams"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(
                    isinstance(n, int) and 1 <= n <= 50 and isinstance(v, int | float) and 0 <= v <= 1
                    for n, v in table.items()):
                raise RecipeError(f"{where}.{name} must map n-gram sizes (1..50) to fractions in [0, 1]")


@dataclass(frozen=True)
class C4Quality(Measured):
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
        super().check(where)
        positive(where, "max_word_length", self.max_word_length)


@dataclass(frozen=True)
class FineWebQuality(Measured):
    """FineWeb rules (Penedo et al. 2024) as datatrove's FineWebQualityFilter."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def check(self, where: str) -> None:
        super().check(where)
        fractions(where, self, "line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio")


class QualityFilterStep(PrepStep):
    """A step that runs one datatrove filter: its ``filter(doc)`` verdict, with datatrove's reason, is the step's."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.filter = self.build_filter()

    def build_filter(self):
        """Return the datatrove filter that judges a document under ``self.config``."""
        raise NotImplementedError

    def filter_kwargs(self) -> dict[str, Any]:
        """Return the settings datatrove's filter takes as they are (all but what says which text to judge)."""
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in MEASURE_SETTINGS}

    def decide(self, doc: Candidate) -> str | None:
        from datatrove.data import Document as DtDocument

        judged = DtDocument(text=doc.text, id=doc.id)
        verdict = self.filter.filter(judged)
        if verdict is True or (isinstance(verdict, tuple) and verdict[0]):
            doc.text = self.kept_text(doc.text, judged.text)
            return None
        return str(verdict[1]) if isinstance(verdict, tuple) and len(verdict) > 1 else "rejected"

    def kept_text(self, before: str, after: str) -> str:
        """Return a kept document's text: the filter's (only C4 may change it, when the recipe asks it to)."""
        return after


class GopherQualityStep(QualityFilterStep):
    name = "gopher_quality"
    Config = GopherQuality

    def build_filter(self):
        from nightshift.prep.heuristics import FastGopherQualityFilter, tokenizer

        return FastGopherQualityFilter(**self.filter_kwargs(), language=tokenizer())


class GopherRepetitionStep(QualityFilterStep):
    name = "gopher_repetition"
    Config = GopherRepetition

    def build_filter(self):
        from nightshift.prep.heuristics import FastGopherRepetitionFilter, tokenizer

        c = self.config
        return FastGopherRepetitionFilter(
            dup_line_frac=c.dup_line_frac, dup_para_frac=c.dup_para_frac, dup_line_char_frac=c.dup_line_char_frac,
            dup_para_char_frac=c.dup_para_char_frac, top_n_grams=tuple(sorted(c.top_n_grams.items())),
            dup_n_grams=tuple(sorted(c.dup_n_grams.items())), language=tokenizer())


class C4QualityStep(QualityFilterStep):
    name = "c4_quality"
    Config = C4Quality

    def build_filter(self):
        from nightshift.prep.heuristics import FastC4QualityFilter, tokenizer

        return FastC4QualityFilter(**self.filter_kwargs(), language=tokenizer())

    def kept_text(self, before: str, after: str) -> str:
        # C4 strips every line as it rejoins them; no line removed means no change.
        return before if after == "\n".join(x.strip() for x in before.splitlines()).strip() else after


class FineWebQualityStep(QualityFilterStep):
    name = "fineweb_quality"
    Config = FineWebQuality

    def build_filter(self):
        from datatrove.pipeline.filters import FineWebQualityFilter

        from nightshift.prep.heuristics import tokenizer

        return FineWebQualityFilter(**self.filter_kwargs(), language=tokenizer())
