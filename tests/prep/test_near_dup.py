import random

import numpy as np

from nightshift.prep.near_dup import (
    MinHasher,
    candidate_threshold,
    exact_jaccard,
    find_near_duplicates,
    lsh_bands,
    shingle_hashes,
    shingle_sets,
)
from planted import jaccard, prose, variant


def planted_pairs(seed: int, targets, per_target: int, above: bool):
    """Return documents and the planted pairs (i, j, exact Jaccard) among them."""
    rng = random.Random(seed)
    docs, pairs = [], []
    for target in targets:
        for _ in range(per_target):
            base = prose(rng, 3, 5)
            other, j = variant(rng, base, target, above=above)
            docs.extend([base, other])
            pairs.append((len(docs) - 2, len(docs) - 1, j))
    return docs, pairs


def test_planted_near_duplicates_are_removed_with_precision_and_recall_above_95_percent():
    docs, pairs = planted_pairs(1, [0.8, 0.85, 0.9, 0.95], 60, above=True)
    low_docs, low_pairs = planted_pairs(2, [0.2, 0.35, 0.5], 60, above=False)
    offset = len(docs)
    docs += low_docs
    pairs += [(i + offset, j + offset, sim) for i, j, sim in low_pairs]
    rng = random.Random(3)
    docs += [prose(rng, 3, 5) for _ in range(300)]  # unrelated documents

    clusters = find_near_duplicates(MinHasher().signatures(docs), 0.8, docs)
    removed = set(clusters.duplicate_of)
    high = [(i, j) for i, j, sim in pairs if sim >= 0.8]
    low = [(i, j) for i, j, sim in pairs if sim <= 0.5]
    assert len(high) == 240 and len(low) == 180
    true_removals = sum(j in removed for _, j in high)
    recall = true_removals / len(high)
    precision = true_removals / len(removed)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert not any(j in removed or i in removed for i, j in low)  # nothing at or below J = 0.5
    assert all(clusters.duplicate_of[j] == i for i, j in high if j in removed)  # the first of a pair is kept


def test_the_kept_document_of_a_cluster_is_the_first_in_corpus_order():
    rng = random.Random(5)
    base = prose(rng, 3, 5)
    copies = [variant(rng, base, 0.92)[0] for _ in range(4)]
    docs = [prose(rng, 3, 5), copies[0], base, copies[1], copies[2], prose(rng, 3, 5), copies[3]]
    clusters = find_near_duplicates(MinHasher().signatures(docs), 0.8, docs)
    assert clusters.clusters == 1
    assert sorted(clusters.duplicate_of) == [2, 3, 4, 6] and set(clusters.duplicate_of.values()) == {1}


def test_signature_agreement_estimates_jaccard_without_bias():
    rng = random.Random(9)
    errors = []
    hasher = MinHasher()
    for target in (0.3, 0.6, 0.9):
        for _ in range(40):
            a = prose(rng, 3, 5)
            b, j = variant(rng, a, target)
            sig = hasher.signatures([a, b])
            errors.append(float((sig[0] == sig[1]).mean()) - j)
    assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.06


def test_signatures_are_stable_across_batches_and_case_and_punctuation():
    hasher = MinHasher()
    a = "The dome opens at dusk, and the gallery closes at midnight on Fridays."
    together = hasher.signatures([a, "other words entirely here now please", a.upper().replace(",", " ;")])
    alone = hasher.signatures([a])
    assert (together[0] == alone[0]).all() and (together[2] == alone[0]).all()
    assert (hasher.signatures([""]) == 0xFFFFFFFF).all()


def test_short_texts_are_one_shingle_of_all_their_words():
    shingles, doc = shingle_hashes(["two words", "one", "five words make one shingle"], 5, whole_below=1)
    assert doc.tolist() == [2, 0, 1] and len(set(shingles.tolist())) == 3


def test_bands_find_a_pair_at_the_threshold_with_high_probability():
    bands, rows = lsh_bands(128, 0.8)
    low = candidate_threshold(128, 0.8)
    assert bands * rows <= 128
    assert 1 - (1 - low**rows) ** bands >= 0.995
    assert 0.7 < low < 0.8


def test_exact_jaccard_helper():
    assert jaccard("a b c d e f", "a b c d e f") == 1.0
    assert jaccard("a b c d e f", "a b c d e g") == 1 / 3


def pairs_between(seed: int, lo: float, hi: float, count: int) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Return documents holding ``count`` planted pairs whose exact shingle Jaccard lies in [lo, hi]."""
    rng = random.Random(seed)
    docs, pairs = [], []
    while len(pairs) < count:
        base = prose(rng, 3, 5)
        other, j = variant(rng, base, rng.uniform(lo, hi))
        if lo <= j <= hi:
            docs.extend([base, other])
            pairs.append((len(docs) - 2, len(docs) - 1, j))
    return docs, pairs


def test_pairs_below_the_threshold_are_all_kept_and_pairs_above_it_removed():
    close_docs, close = pairs_between(11, 0.70, 0.74, 150)  # estimates of these often reach 0.73-0.8
    above_docs, above = pairs_between(12, 0.80, 0.97, 150)
    offset = len(close_docs)
    docs = close_docs + above_docs
    above = [(i + offset, j + offset, sim) for i, j, sim in above]
    rng = random.Random(13)
    docs += [prose(rng, 3, 5) for _ in range(100)]

    clusters = find_near_duplicates(MinHasher().signatures(docs), 0.8, docs)
    removed = set(clusters.duplicate_of)
    kept_close = sum(i not in removed and j not in removed for i, j, _ in close)
    recall = sum(j in removed for _, j, _ in above) / len(above)
    assert kept_close == 150, f"{150 - kept_close} of 150 pairs at J 0.70-0.74 removed under 0.8"
    assert recall >= 0.99, recall
    assert removed == {j for _, j, _ in above if j in removed}  # nothing else is removed
    assert all(clusters.duplicate_of[j] == i for i, j, _ in above if j in removed)


def test_texts_may_be_read_on_demand_and_only_candidates_are_read():
    rng = random.Random(21)
    base = prose(rng, 3, 5)
    docs = [base, variant(rng, base, 0.9, above=True)[0]] + [prose(rng, 3, 5) for _ in range(20)]
    asked: list[int] = []

    def texts_of(rows):
        asked.extend(rows)
        return [docs[r] for r in rows]

    clusters = find_near_duplicates(MinHasher().signatures(docs), 0.8, texts_of)
    assert clusters.duplicate_of == {1: 0} and sorted(asked) == [0, 1]


def test_exact_jaccard_of_shingle_sets_matches_the_string_definition():
    rng = random.Random(31)
    texts = [prose(rng, 2, 4) for _ in range(4)]
    texts += [variant(rng, texts[0], t)[0] for t in (0.3, 0.72, 0.9)] + ["", "two words"]
    sets = shingle_sets(texts, 5)
    for a in range(len(texts)):
        for b in range(len(texts)):
            assert abs(exact_jaccard(sets[a], sets[b]) - jaccard(texts[a], texts[b])) < 1e-9


def test_a_chain_of_documents_each_close_to_the_next_is_not_removed_past_the_threshold():
    rng = random.Random(7)
    words = " ".join(prose(rng, 40, 40) for _ in range(3)).split()
    # Windows of 1,000 words sliding by 20: neighbours share ~98% of their shingles, the ends of the chain far less.
    docs = [" ".join(words[20 * k: 20 * k + 1000]) for k in range(12)]
    assert len(words) >= 20 * 11 + 1000
    sets = shingle_sets(docs, 5)
    clusters = find_near_duplicates(MinHasher().signatures(docs), 0.8, docs)
    kept = [i for i in range(len(docs)) if i not in clusters.duplicate_of]
    for doc, first in clusters.duplicate_of.items():
        assert first in kept and exact_jaccard(sets[doc], sets[first]) >= 0.8
    for i in kept:  # no two kept documents are duplicates of each other
        assert all(exact_jaccard(sets[i], sets[j]) < 0.8 for j in kept if j != i)
    far = [i for i in range(len(docs)) if exact_jaccard(sets[0], sets[i]) < 0.8]
    assert far and far[0] in kept  # the first document too far from the first kept one starts a group of its own
