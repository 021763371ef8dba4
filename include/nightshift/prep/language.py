"""Language identification with py3langid, whose model ships inside its wheel (no download at run time)."""

from __future__ import annotations

from functools import lru_cache

from nightshift.prep.recipe import Language


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
