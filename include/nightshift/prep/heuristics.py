"""Quality heuristics of the Gopher, C4 and FineWeb kind, run by datatrove's own filters.

Two measured bottlenecks are replaced, nothing else:

- datatrove splits words with a spaCy blank tokenizer: 0.3 MB/s per core on English prose, 95% of the
  filters' time. ``RegexWordTokenizer`` (datatrove's ``WordTokenizer`` interface, passed as the filters'
  ``language``) splits on word characters and runs of punctuation, which is what the rules count.
- ``GopherRepetitionFilter`` builds every n-gram as a joined string (n = 2..10): 1 MB/s per core even with the
  regex tokenizer. ``FastGopherRepetitionFilter`` computes the same fractions from hashed n-grams.
- ``GopherQualityFilter`` tests every character of every word in Python generators (13% of the recipe's
  time). ``FastGopherQualityFilter`` classifies each distinct token once and counts with the memo.

Both are checked against datatrove's filters, verdict for verdict, in tests/prep/test_heuristics.py.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np
from datatrove.data import Document as DtDocument
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.c4_filters import POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils.text import PUNCTUATION_SET, split_into_sentences, split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer

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
        return _word_tokens(text)

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


@lru_cache(maxsize=256)
def _word_tokens(text: str) -> list[str]:
    """Return ``_WORDS.findall(text)``, 1.6x faster: whitespace-separated runs of word characters (most of
    them) are tokens already, so the pattern only runs on the rest."""
    # Each quality step tokenizes a batch of up to 64 documents; datatrove's own cache keeps only 5 texts.
    tokens: list[str] = []
    find = _WORDS.findall
    for part in text.split():
        if part.isalnum():
            tokens.append(part)
        else:
            tokens.extend(find(part))
    return tokens


@lru_cache(maxsize=1)
def tokenizer() -> RegexWordTokenizer:
    return RegexWordTokenizer()


def _hash_words(words: list[str]) -> np.ndarray:
    # Python's string hash: compared only within one document, so its per-process salt does not matter.
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


class _TokenKinds(dict):
    """token -> (has a character outside datatrove's punctuation set, has a letter), computed once per token."""

    def __missing__(self, token: str) -> tuple[bool, bool]:
        if len(self) > 1_000_000:  # bounded: a night of random tokens must not grow it without end
            self.clear()
        kind = (any(ch not in PUNCTUATION_SET for ch in token), any(ch.isalpha() for ch in token))
        self[token] = kind
        return kind


_KINDS = _TokenKinds()


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter with per-token character tests memoised.

    ``alpha_words="whitespace"`` counts the alpha ratio over whitespace-separated words, the Gopher paper's
    definition ("80% of words contain at least one alphabetic character"): datatrove counts every punctuation
    mark as a word, so ``git-log(1)`` or ``pg_dump --schema=name`` fail it although every word holds a letter.
    """

    def __init__(self, *args: Any, alpha_words: str = "tokens", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha_words = alpha_words

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        kinds = [_KINDS[w] for w in words]
        non_symbol_lengths = [len(w) for w, (word, _) in zip(words, kinds, strict=True) if word]
        n_non_symbol = len(non_symbol_lengths)
        if self.min_doc_words and n_non_symbol < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol > self.max_doc_words:
            return False, "gopher_long_doc"
        avg = sum(non_symbol_lengths) / n_non_symbol if n_non_symbol else float("nan")
        if self.min_avg_word_length and avg < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if self.max_bullet_lines_ratio and sum(
                s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio and sum(
                s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio and _alpha_share(text, kinds, self.alpha_words) < \
                self.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


def _alpha_share(text: str, kinds: list[tuple[bool, bool]], alpha_words: str) -> float:
    """Return the share of words holding a letter: of tokens, or of whitespace-separated words."""
    if alpha_words == "whitespace":
        words = text.split()
        return sum(_KINDS[w][1] for w in words) / len(words) if words else 0.0
    return sum(alpha for _, alpha in kinds) / len(kinds) if kinds else 0.0


class FastC4QualityFilter(C4QualityFilter):
    """datatrove's C4QualityFilter, with a document-level shortcut when no line rule can fire.

    When the document holds none of the words the line rules look for, no word over the length limit, and the
    recipe removes no lines by punctuation or length, every line is kept and only the sentence count decides;
    the line-by-line pass (a sentence split and two statistics updates per line) is then skipped.
    """

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        text = doc.text
        lowered = text.lower()
        if (not self.split_paragraph or self.remove_citations or self.filter_no_terminal_punct
                or self.min_words_per_line > 0
                or (self.filter_lorem_ipsum and "lorem ipsum" in lowered)
                or (self.filter_javascript and "javascript" in lowered)
                or (self.filter_curly_bracket and "{" in text)
                or (self.filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS))
                or (self.max_word_length != -1 and _LONG_WORD(self.max_word_length).search(text))):
            return super().filter(doc)
        sentences = 0
        if self.min_num_sentences > 0:
            for line in text.splitlines():
                sentences += len(split_into_sentences(line.strip(), self.language))
                if sentences >= self.min_num_sentences:
                    break
        if sentences < self.min_num_sentences:
            return False, "too_few_sentences"
        doc.text = "\n".join(line.strip() for line in text.splitlines()).strip()
        return True


@lru_cache(maxsize=8)
def _LONG_WORD(limit: int) -> re.Pattern:  # noqa: N802
    return re.compile(rf"\S{{{limit + 1}}}")


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
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        cum = np.concatenate(([0], np.cumsum(lengths)))
        grams = {1: hashes}
        for n in range(2, max([n for n, _ in (*self.top_n_grams, *self.dup_n_grams)], default=1) + 1):
            prev = grams[n - 1]
            if len(prev) < 2:
                break
            with np.errstate(over="ignore"):
                grams[n] = prev[:-1] * _PRIME + hashes[n - 1:]
        all_distinct = False  # once the n-grams of some n are all distinct, so are those of every larger n
        for n, n_frac in sorted(self.top_n_grams):
            gram = grams.get(n)
            if gram is None or not len(gram):
                continue
            if all_distinct:
                top, start = 1, 0
            else:
                _, first, counts = np.unique(gram, return_index=True, return_counts=True)
                top = counts.max()
                start = int(first[counts == top].min())  # Counter.most_common keeps the first-seen of equal counts
                all_distinct = top == 1
            top_chars = int(cum[start + n] - cum[start]) + n - 1  # " ".join of the n words
            if top_chars * int(top) / len(text) > n_frac:
                return False, f"top_{n}_gram"
        for n, n_frac in sorted(self.dup_n_grams):
            gram = grams.get(n)
            if gram is None or not len(gram):
                continue
            if all_distinct:
                break  # no repeated shorter n-gram, so no repeated n-gram of this size or larger
            repeated = _repeated_chars(gram, cum, n)
            if repeated == 0:
                all_distinct = True
                continue
            if n_frac < 1 and repeated / len(text) > n_frac:
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
