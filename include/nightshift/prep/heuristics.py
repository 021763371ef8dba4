"""Quality heuristics of the Gopher, C4 and FineWeb kind, run by datatrove's own filters.

Two measured bottlenecks are replaced, nothing else:

- datatrove splits words with a spaCy blank tokenizer: 0.3 MB/s per core on English prose, 95% of the
  filters' time. ``RegexWordTokenizer`` (datatrove's ``WordTokenizer`` interface, passed as the filters'
  ``language``) splits on word characters and runs of punctuation, which is what the rules count.
- ``GopherRepetitionFilter`` builds every n-gram as a joined string (n = 2..10): 1 MB/s per core even with the
  regex tokenizer. ``FastGopherRepetitionFilter`` computes the same fractions from hashed n-grams, and is
  checked against datatrove's filter in tests/prep/test_heuristics.py.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np
from datatrove.data import Document as DtDocument
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils.text import split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer

from nightshift.prep.recipe import C4Quality, FineWebQuality, GopherQuality, GopherRepetition

# Close to spaCy's English tokens: URLs, e-mail addresses and numbers with separators stay whole, clitics
# ('s, n't) and every punctuation mark are tokens of their own, except runs of dots and dashes.
_WORDS = re.compile(r"https?://\S+?(?=[.,;:!?)\]\"']*(?:\s|$))|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\d+(?:[.,:/]\d+)+"
                    r"|\w+|['’]\w+|\.{2,}|-{2,}|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”)\]]*\s+")
_PRIME = np.uint64(0x100000001B3)


class RegexWordTokenizer(WordTokenizer):
    """Words (letters, digits, inner apostrophes) and punctuation runs as separate tokens."""

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text) if text[a:b].strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans

    def __reduce__(self):  # one shared instance per process keeps datatrove's split_into_words cache warm
        return (tokenizer, ())


@lru_cache(maxsize=1)
def tokenizer() -> RegexWordTokenizer:
    return RegexWordTokenizer()


def _hash_words(words: list[str]) -> np.ndarray:
    # Python's string hash: compared only within one document, so its per-process salt does not matter.
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter with n-grams compared by 64-bit hashes instead of joined strings."""

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        paragraphs_duplicates, char_duplicates = find_duplicates(paragraphs)
        if self.dup_para_frac and paragraphs_duplicates / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_duplicates / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        line_duplicates, char_duplicates = find_duplicates(lines)
        if self.dup_line_frac and line_duplicates / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_duplicates / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_into_words(text, self.language)
        if not words:
            return True
        hashes = _hash_words(words)
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        cum = np.concatenate(([0], np.cumsum(lengths)))
        grams = {1: hashes}
        for n in range(2, max([n for n, _ in (*self.top_n_grams, *self.dup_n_grams)], default=1) + 1):
            prev = grams[n - 1]
            if len(prev) < 2:
                break
            with np.errstate(over="ignore"):
                grams[n] = prev[:-1] * _PRIME + hashes[n - 1:]
        for n, n_frac in self.top_n_grams:
            gram = grams.get(n)
            if gram is None or not len(gram):
                continue
            _, first, counts = np.unique(gram, return_index=True, return_counts=True)
            top = counts.max()
            start = int(first[counts == top].min())  # Counter.most_common keeps the first-seen of equal counts
            top_chars = int(cum[start + n] - cum[start]) + n - 1  # " ".join of the n words
            if top_chars * int(top) / len(text) > n_frac:
                return False, f"top_{n}_gram"
        for n, n_frac in self.dup_n_grams:
            gram = grams.get(n)
            if gram is None or not len(gram):
                continue
            if n_frac < 1 and _repeated_chars(gram, cum, n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True


def _repeated_chars(gram: np.ndarray, cum: np.ndarray, n: int) -> int:
    """datatrove's find_all_duplicate on hashed n-grams: characters of n-grams seen before, skipping past each."""
    if len(np.unique(gram)) == len(gram):
        return 0
    seen: set[int] = set()
    repeated, idx, last = 0, 0, len(gram)
    values = gram.tolist()
    while idx < last:
        value = values[idx]
        if value in seen:
            repeated += int(cum[idx + n] - cum[idx])
            idx += n
        else:
            seen.add(value)
            idx += 1
    return repeated


def build_filter(step: str, config: Any):
    """Return the datatrove filter for one quality step of the recipe."""
    tok = tokenizer()
    if step == "gopher_quality":
        assert isinstance(config, GopherQuality)
        return GopherQualityFilter(**_kwargs(config), language=tok)
    if step == "gopher_repetition":
        assert isinstance(config, GopherRepetition)
        return FastGopherRepetitionFilter(
            dup_line_frac=config.dup_line_frac, dup_para_frac=config.dup_para_frac,
            dup_line_char_frac=config.dup_line_char_frac, dup_para_char_frac=config.dup_para_char_frac,
            top_n_grams=tuple(sorted(config.top_n_grams.items())),
            dup_n_grams=tuple(sorted(config.dup_n_grams.items())), language=tok)
    if step == "c4_quality":
        assert isinstance(config, C4Quality)
        return C4QualityFilter(**_kwargs(config), language=tok)
    if step == "fineweb_quality":
        assert isinstance(config, FineWebQuality)
        return FineWebQualityFilter(**_kwargs(config), language=tok)
    raise ValueError(f"not a quality step: {step}")


def _kwargs(config: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)


QUALITY_STEPS = ("gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality")


def run_filter(filt, text: str, doc_id: str) -> tuple[str | None, str]:
    """Return (reason to drop or None, text after the filter): C4 may remove lines when the recipe asks it to."""
    doc = DtDocument(text=text, id=doc_id)
    verdict = filt.filter(doc)
    if verdict is True or (isinstance(verdict, tuple) and verdict[0]):
        return None, doc.text
    reason = verdict[1] if isinstance(verdict, tuple) and len(verdict) > 1 else "rejected"
    return str(reason), doc.text
