"""Language identification with py3langid, whose model ships inside its wheel (no download at run time)."""

from __future__ import annotations

from functools import lru_cache

from nightshift.prep.recipe import Language


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, config: Language) -> tuple[str, float]:
    """Return the most likely language of the start of ``text`` and its probability."""
    lang, prob = _identifier().classify(text[: config.sample_chars])
    return str(lang), float(prob)


def language_verdict(text: str, config: Language) -> tuple[str | None, str, float]:
    """Return (reason to drop or None, language, probability) for one document."""
    lang, prob = identify(text, config)
    if lang not in config.keep:
        return f"language_{lang}", lang, prob
    if prob < config.min_confidence:
        return "language_low_confidence", lang, prob
    return None, lang, prob
