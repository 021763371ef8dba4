"""Near-duplicate detection with MinHash LSH over word shingles, vectorised with numpy.

Words are hashed together from one prefix sum over the bytes of a batch of documents, shingles combine word
hashes (no n-gram strings are built), one hash per shingle fills all bins (one-permutation MinHash), and the
LSH index is built once over all signatures with sorts instead of a dict per band. Written by hand because
the libraries are the bottleneck: they take shingles as Python strings, and building those caps datasketch
(sha1 per shingle, k permutations) and rensa alike. ``bench/dedup.py`` measures all three on the same word
5-gram shingles, signature length and threshold.

Decision rule, for a recipe threshold t and k permutations:
- candidates: documents that agree on every row of at least one band; bands and rows are chosen so that a
  pair at similarity t becomes a candidate with probability >= 0.995;
- a candidate pair is a duplicate when its estimated Jaccard similarity (the share of equal signature
  slots) is at least t - 2.33 sd, sd = sqrt(t (1 - t) / k): a pair at exactly t passes with probability
  0.99, so recall holds at the threshold, while a pair at 0.5 passes with probability below 1e-4 at k = 128.
- duplicates are clustered (union-find); the first document of every cluster, in corpus order, is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_Z = 2.33
_FULL = np.uint32(0xFFFFFFFF)
_SHINGLE_MUL = np.uint64(0x100000001B3)
_ROTATE = np.uint32(0x9E3779B1)
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


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place."""
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


@dataclass(frozen=True)
class MinHasher:
    """One-permutation MinHash (Li, Owen and Zhang 2012) with densification by rotation (Shrivastava and Li 2014).

    Every shingle is hashed once; its hash picks one of ``num_perm`` bins and the bin keeps the smallest value.
    That costs O(shingles + bins) per document instead of O(shingles x permutations), and estimates Jaccard
    similarity as the share of equal bins, like k-permutation MinHash.
    """

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def signatures(self, texts: list[str]) -> np.ndarray:
        """Return one uint32 signature row per text (all bins 0xFFFFFFFF for a text without words)."""
        k = self.num_perm
        sig = np.full(len(texts) * k, _FULL, np.uint32)
        if not texts:
            return sig.reshape(0, k)
        shingles, shingle_doc = shingle_hashes(texts, self.ngram, whole_below=1)
        with np.errstate(over="ignore"):
            mixed = _fmix(shingles ^ np.uint64(self.seed * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
            bins = (((mixed >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)).astype(np.int64)
        np.minimum.at(sig, shingle_doc * k + bins, mixed.astype(np.uint32))
        return _densify(sig.reshape(len(texts), k))


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
    with np.errstate(over="ignore"):
        shingles = words[:m].copy()
        for j in range(1, n):
            shingles *= _SHINGLE_MUL
            shingles += words[j: j + m]
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


def whole_hash(words: np.ndarray) -> np.uint64:
    """Return the shingle hash of a whole run of word hashes (equal to ``shingle_hashes`` with n = len)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for w in words:
            h = h * _SHINGLE_MUL + w
    return h


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill empty bins from the next non-empty bin to the right (circularly), offset by the distance."""
    empty = sig == _FULL
    rows = np.flatnonzero(empty.any(axis=1) & ~empty.all(axis=1))
    if not len(rows):
        return sig
    k = sig.shape[1]
    part = sig[rows]
    doubled = np.concatenate((part, part), axis=1)
    index = np.where(np.concatenate((~empty[rows], ~empty[rows]), axis=1), np.arange(2 * k), 2 * k)
    nearest = np.minimum.accumulate(index[:, ::-1], axis=1)[:, ::-1][:, :k]
    distance = (nearest - np.arange(k)).astype(np.uint32)
    with np.errstate(over="ignore"):
        filled = np.take_along_axis(doubled, nearest, axis=1) + distance * _ROTATE
    sig[rows] = np.where(empty[rows], filled, part)
    return sig


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """Return (bands, rows): the most rows per band that still finds a pair at the verify threshold >= 99.5%."""
    low = verify_threshold(num_perm, threshold)
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1:
            break
        if 1 - (1 - low**rows) ** bands >= 0.995:
            best = (bands, rows)
    return best


def verify_threshold(num_perm: int, threshold: float) -> float:
    """Return the estimated similarity a candidate pair needs: the threshold less 2.33 standard errors."""
    return threshold - _Z * math.sqrt(threshold * (1 - threshold) / num_perm)


@dataclass
class Clusters:
    """Outcome of near-duplicate detection over n documents in corpus order."""

    duplicate_of: dict[int, int]
    """index of every removed document -> index of the kept document of its cluster."""
    clusters: int
    """Clusters of two or more documents."""
    candidate_pairs: int
    verified_pairs: int


def find_near_duplicates(signatures: np.ndarray, threshold: float) -> Clusters:
    """Cluster documents (rows of ``signatures``, in corpus order) whose similarity reaches the threshold."""
    n, num_perm = signatures.shape
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands, rows = lsh_bands(num_perm, threshold)
    need = math.ceil(verify_threshold(num_perm, threshold) * num_perm)
    candidates = verified = 0
    checked: set[tuple[int, int]] = set()
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel() if n else block
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))) if n else np.array([])
        ends = np.append(starts[1:], n) if n else np.array([])
        shared = np.flatnonzero(ends - starts >= 2)
        for s, e in zip(starts[shared].tolist(), ends[shared].tolist(), strict=True):
            members = np.sort(order[s:e])
            # Each member is compared with the earlier members of its bucket (at most 32 of them).
            for j_pos in range(1, len(members)):
                j = int(members[j_pos])
                earlier = members[max(0, j_pos - 32):j_pos]
                fresh = [int(i) for i in earlier if (int(i), j) not in checked]
                if not fresh:
                    continue
                checked.update((i, j) for i in fresh)
                candidates += len(fresh)
                equal = (signatures[fresh] == signatures[j]).sum(axis=1)
                for i, eq in zip(fresh, equal, strict=True):
                    if eq >= need:
                        verified += 1
                        ri, rj = root(i), root(j)
                        if ri != rj:
                            parent[max(ri, rj)] = min(ri, rj)
    duplicate_of: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for i in range(n):
        r = root(i)
        if r != i:
            duplicate_of[i] = r
            sizes[r] = sizes.get(r, 1) + 1
    return Clusters(duplicate_of, len(sizes), candidates, verified)
