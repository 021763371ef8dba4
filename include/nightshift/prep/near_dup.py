"""Near-duplicate detection: MinHash LSH over word shingles finds candidates, exact Jaccard decides.

Words are hashed together from one prefix sum over the bytes of a batch of documents and shingles combine
word hashes, so no n-gram string is ever built; rensa (Rust) turns the shingle hashes into k-permutation
MinHash signatures; the LSH index is built once over all signatures with sorts instead of a dict per band.
The shingling is written by hand because it is the measured bottleneck: datasketch and rensa take shingles
as Python strings, and building those runs at about 13 MB/s, while rensa's own hashing runs at 240 MB/s.
``bench/dedup.py`` measures all three on the same word 5-gram shingles, signature length and threshold.

Decision rule, for a recipe threshold t and k permutations:
- candidates: documents that agree on every row of at least one band; bands and rows are chosen so that a
  pair at similarity t - 2.33 sd (sd = sqrt(t (1 - t) / k)) becomes a candidate with probability >= 0.995,
  so a pair at t or above is missed far less often than that;
- a candidate pair is a duplicate only when the exact Jaccard similarity of its two shingle sets is at
  least t. The MinHash estimate only rejects early: a candidate whose share of equal signature slots is
  below t - 5 sd is not compared (a pair at t falls there with probability below 1e-6). An estimate alone
  cannot decide: accepting at t - 2.33 sd, as recall at t needs, removes most pairs at 0.70-0.74 under 0.8.
- in corpus order, a document is removed when it is a duplicate of a document that is kept (never only of
  one that was removed itself, so similarity does not chain past the threshold); the first is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_Z = 2.33
_Z_REJECT = 5.0
_SHINGLE_MUL = np.uint64(0x100000001B3)
_BASE = np.uint32(0x9E3779B1)

# Bytes of word characters map to themselves (ASCII letters lowercased), all others to 0. Bytes of non-ASCII
# UTF-8 sequences count as word characters: letters of every script stay words, at the cost of joining a few
# non-ASCII punctuation marks to their neighbours, which only shifts shingle boundaries.
_CODES = np.zeros(256, np.uint8)
_CODES[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789_", np.uint8)] = np.frombuffer(
    b"abcdefghijklmnopqrstuvwxyz0123456789_", np.uint8)
_CODES[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
_CODES[128:] = np.arange(128, 256, dtype=np.uint8)


def _inverse(b: np.uint32) -> np.uint32:
    x = np.uint32(1)
    with np.errstate(over="ignore"):
        for _ in range(6):  # Newton's iteration doubles the correct low bits each step
            x = x * (np.uint32(2) - b * x)
    return x


class _Powers:
    """B**i and B**-i modulo 2**32, grown on demand: word hashes become differences of one prefix sum."""

    def __init__(self) -> None:
        self.up = np.ones(1, np.uint32)
        self.down = np.ones(1, np.uint32)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            m = max(n, 1 << 20, 2 * len(self.up))
            with np.errstate(over="ignore"):
                self.up = np.cumprod(np.full(m, _BASE, np.uint32), dtype=np.uint32) * _inverse(_BASE)
                self.down = np.cumprod(np.full(m, _inverse(_BASE), np.uint32), dtype=np.uint32) * _BASE
        return self.up[:n], self.down[:n]


_POWERS = _Powers()


@dataclass(frozen=True)
class MinHasher:
    """k-permutation MinHash signatures of word-shingle sets, computed by rensa from numpy shingle hashes."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def signatures(self, texts: list[str]) -> np.ndarray:
        """Return one uint32 signature row per text (all 0xFFFFFFFF for a text without words)."""
        import rensa

        if not texts:
            return np.empty((0, self.num_perm), np.uint32)
        shingles, shingle_doc = shingle_hashes(texts, self.ngram, whole_below=1)
        if len(shingle_doc) and (np.diff(shingle_doc) < 0).any():  # short texts' shingles were appended last
            order = np.argsort(shingle_doc, kind="stable")
            shingles, shingle_doc = shingles[order], shingle_doc[order]
        offsets = np.zeros(len(texts) + 1, np.uint64)
        np.cumsum(np.bincount(shingle_doc, minlength=len(texts)), out=offsets[1:])
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, offsets, self.num_perm, self.seed)
        return np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), self.num_perm)


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return the 64-bit hashes of the lowercased words of all texts, and how many words each text has."""
    encoded = [t.encode("utf-8", "replace") for t in texts]
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(e) + 1 for e in encoded], out=offsets[1:])
    codes = _CODES[np.frombuffer(b"\0".join(encoded) + b"\0", np.uint8)]
    inside = codes != 0
    edges = np.flatnonzero(inside[1:] != inside[:-1]) + 1
    if inside[0]:
        edges = np.concatenate(([0], edges))
    starts, ends = edges[0::2], edges[1::2]
    up, down = _POWERS.get(len(codes) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(codes) + 1, np.uint32)
        np.cumsum(codes * up[: len(codes)], dtype=np.uint32, out=prefix[1:])
        words = ((prefix[ends] - prefix[starts]) * down[starts]).astype(np.uint64)
    return words, np.diff(np.searchsorted(starts, offsets))


def shingle_hashes(texts: list[str], n: int, whole_below: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the hash of every run of n words of every text, and the text each belongs to.

    A text with fewer than n words (and at least ``whole_below``) gives one shingle of all its words.
    """
    words, per_doc = word_hashes(texts)
    word_doc = np.repeat(np.arange(len(texts)), per_doc)
    m = max(len(words) - n + 1, 0)
    shingles = ngram_hashes(words, n)
    same_doc = word_doc[:m] == word_doc[n - 1: n - 1 + m]
    shingles, shingle_doc = shingles[same_doc], word_doc[:m][same_doc]
    if whole_below is not None:
        short = np.flatnonzero((per_doc >= whole_below) & (per_doc < n))
        if len(short):
            first = np.concatenate(([0], np.cumsum(per_doc)))
            extra = [whole_hash(words[first[d]:first[d + 1]]) for d in short.tolist()]
            shingles = np.concatenate((shingles, np.array(extra, np.uint64)))
            shingle_doc = np.concatenate((shingle_doc, short))
    return shingles, shingle_doc


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Return the hash of every run of n consecutive word hashes (across text boundaries: callers mask those)."""
    m = max(len(words) - n + 1, 0)
    with np.errstate(over="ignore"):
        grams = words[:m].copy()
        for j in range(1, n):
            grams *= _SHINGLE_MUL
            grams += words[j: j + m]
    return grams


def whole_hash(words: np.ndarray) -> np.uint64:
    """Return the shingle hash of a whole run of word hashes (equal to ``shingle_hashes`` with n = len)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for w in words:
            h = h * _SHINGLE_MUL + w
    return h


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """Return (bands, rows): the most rows per band that still finds a pair at the candidate floor >= 99.5%."""
    low = candidate_threshold(num_perm, threshold)
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1:
            break
        if 1 - (1 - low**rows) ** bands >= 0.995:
            best = (bands, rows)
    return best


def candidate_threshold(num_perm: int, threshold: float) -> float:
    """Return the similarity LSH is tuned to find: the threshold less 2.33 standard errors of the estimate."""
    return threshold - _Z * math.sqrt(threshold * (1 - threshold) / num_perm)


def shingle_sets(texts: Sequence[str], ngram: int) -> list[np.ndarray]:
    """Return the sorted unique shingle hashes of every text, as ``MinHasher`` shingles them."""
    shingles, shingle_doc = shingle_hashes(list(texts), ngram, whole_below=1)
    # Grouped by text with a stable integer sort (radix, several times faster than lexsort on both keys); each
    # group is then sorted and deduplicated on its own.
    order = np.argsort(shingle_doc, kind="stable")
    shingles, shingle_doc = shingles[order], shingle_doc[order]
    bounds = np.searchsorted(shingle_doc, np.arange(len(texts) + 1))
    return [np.unique(shingles[bounds[d]:bounds[d + 1]]) for d in range(len(texts))]


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Jaccard similarity of two sorted unique shingle-hash arrays (1.0 for two empty sets)."""
    union = len(a) + len(b)
    if not union:
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (union - common)


@dataclass
class Clusters:
    """Outcome of near-duplicate detection over n documents in corpus order."""

    duplicate_of: dict[int, int]
    """index of every removed document -> index of the kept document of its cluster."""
    clusters: int
    """Clusters of two or more documents."""
    candidate_pairs: int
    verified_pairs: int


TextsOf = Callable[[list[int]], Sequence[str]]
"""Returns the texts of some documents (by row of the signature matrix), in the order asked."""


def find_near_duplicates(signatures: np.ndarray, threshold: float, texts: Sequence[str] | TextsOf,
                         ngram: int = 5) -> Clusters:
    """Cluster documents (rows of ``signatures``, in corpus order) whose exact shingle Jaccard reaches the threshold.

    ``texts`` gives the documents' texts (a sequence, or a function returning the texts of the rows asked for):
    only documents of candidate pairs are read and shingled again, with ``ngram`` words per shingle.
    """
    n, num_perm = signatures.shape
    bands, rows = lsh_bands(num_perm, threshold)
    reject = math.ceil((threshold - _Z_REJECT * math.sqrt(threshold * (1 - threshold) / num_perm)) * num_perm)
    pairs = []
    for band in range(bands):
        keys = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):  # a 64-bit key per band; a rare false match only adds a candidate
            for r in range(band * rows, (band + 1) * rows):
                keys = keys * _SHINGLE_MUL + signatures[:, r].astype(np.uint64)
        order = np.argsort(keys, kind="stable")  # equal keys keep corpus order
        sorted_keys = keys[order]
        # Each document is paired with up to 32 earlier documents of its bucket.
        for d in range(1, min(33, n)):
            same = np.flatnonzero(sorted_keys[d:] == sorted_keys[:-d])
            if not len(same):
                break
            pairs.append(np.stack((order[same], order[same + d]), axis=1))
    candidates = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
    plausible = np.empty((0, 2), np.int64)
    for start in range(0, len(candidates), 1 << 16):
        chunk = candidates[start:start + (1 << 16)]
        equal = (signatures[chunk[:, 0]] == signatures[chunk[:, 1]]).sum(axis=1)
        plausible = np.concatenate((plausible, chunk[equal >= reject]))
    verified = _verify(plausible, threshold, texts, ngram)
    # In corpus order, a document is removed only when it is similar to one that is kept. Clustering the
    # similarity graph instead would be transitive: in a chain of documents each close to the next, the last
    # would be removed as a copy of the first it no longer resembles.
    earlier: dict[int, list[int]] = {}
    for i, j in verified.tolist():
        lo, hi = min(i, j), max(i, j)
        earlier.setdefault(hi, []).append(lo)
    duplicate_of: dict[int, int] = {}
    for i in sorted(earlier):
        kept = [j for j in earlier[i] if j not in duplicate_of]
        if kept:
            duplicate_of[i] = min(kept)
    return Clusters(duplicate_of, len(set(duplicate_of.values())), len(candidates), len(verified))


def _verify(pairs: np.ndarray, threshold: float, texts: Sequence[str] | TextsOf, ngram: int) -> np.ndarray:
    """Return the pairs whose exact shingle Jaccard similarity is at least the threshold."""
    if not len(pairs):
        return pairs
    docs = np.unique(pairs).tolist()
    got = texts(docs) if callable(texts) else [texts[i] for i in docs]
    sets = dict(zip(docs, shingle_sets(got, ngram), strict=True))
    keep = [exact_jaccard(sets[i], sets[j]) >= threshold for i, j in pairs.tolist()]
    return pairs[np.array(keep, bool)]
