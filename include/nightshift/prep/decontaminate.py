"""Find training documents that contain text of an evaluation set (GPT-3's long n-gram overlap rule).

Every n-gram of n words (lowercased, punctuation ignored) of every evaluation item is hashed; a document
sharing any of them with a set is contaminated by that set. Items shorter than n words are matched whole
when they have at least ``min_item_words`` words, so short golden answers still count.

Both sides are normalised the same way before their words are hashed: the cleaning step's ftfy pass (curly
quotes and apostrophes made straight, full-width forms narrowed, NFC; for matching only, invisible characters
dropped and NFKC, so no-break spaces and zero-width characters hide nothing), then the word splitting of
``near_dup``. Without it an item written with ``’`` never matches a document cleaned to ``'``: the word
splitter keeps a non-ASCII apostrophe inside a word and splits at an ASCII one.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nightshift.prep.clean import normalize_text
from nightshift.prep.near_dup import ngram_hashes, shingle_hashes, whole_hash, word_hashes
from nightshift.prep.step_base import Candidate, PrepStep, RecipeError, positive
from nightshift.settings import CONFIG_DIR, SAMPLES_DIR


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
        positive(where, "ngram", self.ngram)
        positive(where, "min_item_words", self.min_item_words)
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


def read_items(path: Path) -> list[str]:
    """Return the text of every item of an evaluation set: JSONL (all string fields joined) or plain lines."""
    items = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                items.append(line)
                continue
            if isinstance(record, dict):
                items.extend(v for v in record.values() if isinstance(v, str) and v.strip())
            elif isinstance(record, str):
                items.append(record)
    return items


# Characters that show as nothing (zero-width space and joiners, word joiner, soft hyphen, byte order mark): a
# copy sprinkled with them reads the same and must match the same.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def match_form(text: str) -> str:
    """Return text as both sides are compared: normalised as the cleaning step normalises documents, then with
    invisible characters removed and compatibility forms folded (NFKC: no-break spaces, full-width letters)."""
    text = normalize_text(text)
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))


@dataclass
class EvalIndex:
    """Hashed n-grams of the configured evaluation sets."""

    ngram: int
    grams: dict[str, dict[int, np.ndarray]]
    """set name -> n-gram length -> sorted unique hashes."""
    items: dict[str, int]

    @classmethod
    def build(cls, config: Decontaminate) -> EvalIndex:
        grams: dict[str, dict[int, np.ndarray]] = {}
        counts: dict[str, int] = {}
        for name in sorted(config.sets):
            texts = [match_form(t) for t in read_items(config.set_path(name))]
            counts[name] = len(texts)
            by_length: dict[int, list] = {}
            full, _ = shingle_hashes(texts, config.ngram)
            by_length[config.ngram] = [full]
            words, per_doc = word_hashes(texts)
            first = np.concatenate(([0], np.cumsum(per_doc)))
            for d in np.flatnonzero((per_doc >= config.min_item_words) & (per_doc < config.ngram)).tolist():
                length = int(per_doc[d])
                by_length.setdefault(length, []).append(np.array([whole_hash(words[first[d]:first[d + 1]])]))
            grams[name] = {length: np.unique(np.concatenate(parts)) for length, parts in by_length.items()}
        return cls(config.ngram, grams, counts)

    def contaminated(self, texts: list[str]) -> list[list[str]]:
        """Return, for each text, the names of the evaluation sets it shares an n-gram with."""
        hits: list[set[str]] = [set() for _ in texts]
        lengths = sorted({length for by_length in self.grams.values() for length in by_length})
        # Cleaned documents are normalised already; normalize_text skips plain ASCII, so this costs little.
        words, per_doc = word_hashes([match_form(t) for t in texts])  # hashed once for every n-gram length
        word_doc = np.repeat(np.arange(len(texts)), per_doc)
        for length in lengths:
            m = len(words) - length + 1
            if m <= 0:
                continue
            grams = ngram_hashes(words, length)
            inside = word_doc[:m] == word_doc[length - 1:length - 1 + m]
            grams, doc = grams[inside], word_doc[:m][inside]
            for name, by_length in self.grams.items():
                table = by_length.get(length)
                if table is None or not len(table):
                    continue
                at = np.minimum(np.searchsorted(table, grams), len(table) - 1)
                for d in np.unique(doc[table[at] == grams]).tolist():
                    hits[d].add(name)
        return [sorted(h) for h in hits]


class DecontaminateStep(PrepStep):
    """Drop (or, with ``action: report``, only mark) documents that share an n-gram with an evaluation set.

    Documents are hashed together: one call per batch is much faster than one per document.
    """

    name = "decontaminate"
    Config = Decontaminate

    def __init__(self, config: Decontaminate) -> None:
        super().__init__(config)
        self.index = EvalIndex.build(config)

    def decide(self, doc: Candidate) -> str | None:
        return self.decide_many([doc])[0]

    def decide_many(self, docs: list[Candidate]) -> list[str | None]:
        found = self.index.contaminated([d.text for d in docs]) if docs else []
        verdicts: list[str | None] = []
        for doc, sets in zip(docs, found, strict=True):
            doc.outcome.contaminated = sets
            verdicts.append("contaminated:" + ",".join(sets) if sets and self.config.action == "drop" else None)
        return verdicts
