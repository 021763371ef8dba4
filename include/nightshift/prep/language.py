"""Language identification with py3langid, whose model ships inside its wheel (no download at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from nightshift.prep.step_base import Candidate, Measured, PrepStep, RecipeError, fraction, positive


@dataclass(frozen=True)
class Language(Measured):
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

    def check(self, where: str) -> None:
        super().check(where)
        if self.sample not in ("start", "spread"):
            raise RecipeError(f"{where}.sample must be start or spread, got {self.sample!r}")
        if not self.keep:
            raise RecipeError(f"{where}.keep must list at least one language code")
        unknown = sorted(set(self.keep) - set(_identifier().labels))
        if unknown:
            raise RecipeError(f"{where}.keep: unknown language codes {unknown} (py3langid knows ISO 639-1 codes)")
        fraction(where, "min_confidence", self.min_confidence)
        positive(where, "sample_chars", self.sample_chars)


class LanguageStep(PrepStep):
    """Drop documents not in a kept language, or whose language is uncertain; record the language found."""

    name = "language"
    Config = Language

    def decide(self, doc: Candidate) -> str | None:
        reason, doc.outcome.language, score = language_verdict(doc.text, self.config)
        doc.outcome.language_score = round(score, 4)
        return reason


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, config: Language) -> tuple[str, float]:
    """Return the most likely language of ``text``'s sample and its probability."""
    lang, prob = _identifier().classify(sample(text, config))
    return str(lang), float(prob)


SENTENCE_WORDS = 4
"""Lines with fewer words (headings, option names, version numbers) tell little about a language."""


def sample(text: str, config: Language) -> str:
    """Return the text py3langid reads: the start of ``text``, or (``sample: spread``) sentence lines taken at
    even intervals over the whole text, up to ``sample_chars``."""
    if config.sample == "start" or len(text) <= config.sample_chars:
        return text[: config.sample_chars]
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= SENTENCE_WORDS]
    if not lines:
        return text[: config.sample_chars]
    picked: list[str] = []
    size = 0
    # Every k-th line, k chosen so the sample ends near the budget; a long line is cut to its share.
    share = max(80, config.sample_chars // min(len(lines), 10))
    step = max(1, len(lines) * share // config.sample_chars)
    for line in lines[::step]:
        picked.append(line[:share])
        size += len(picked[-1]) + 1
        if size >= config.sample_chars:
            break
    return "\n".join(picked)[: config.sample_chars]


def language_verdict(text: str, config: Language) -> tuple[str | None, str, float]:
    """Return (reason to drop or None, language, probability) for one document."""
    lang, prob = identify(text, config)
    if lang not in config.keep:
        return f"language_{lang}", lang, prob
    if prob < config.min_confidence:
        return "language_low_confidence", lang, prob
    return None, lang, prob
