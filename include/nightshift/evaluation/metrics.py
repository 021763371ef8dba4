"""Answer metrics of the golden set: exact match, token F1, ROUGE-L, refusals; and the catalog of every metric.

Exact match and token F1 follow the SQuAD v1.1 evaluation script (lower case, punctuation and the articles
a/an/the removed, whitespace collapsed): a dozen lines, so written here rather than pulling a hub-bound
metrics package. ROUGE-L is Google's ``rouge_score`` (the reference implementation of ROUGE-1.5.5).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class MetricSpec:
    """What a metric means and how the gate compares two models on it."""

    name: str
    description: str
    higher_is_better: bool
    relative: bool = False
    """The difference is the relative change candidate / champion - 1 (perplexities); else candidate - champion."""
    safety: bool = False
    judge: bool = False
    """Needs the LLM judge: unmeasured when no judge is configured."""
    items: str = "answer"
    """Which golden items it is computed on: ``answer``, ``refuse`` or ``blocks`` (held-out token blocks)."""


CATALOG: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("heldout.perplexity", "perplexity of the dataset's held-out split", False, relative=True,
               items="blocks"),
    MetricSpec("golden.perplexity", "perplexity of the reference answers, given the questions", False,
               relative=True),
    MetricSpec("golden.exact_match", "greedy answer equals the reference (SQuAD normalisation)", True),
    MetricSpec("golden.token_f1", "token F1 of the greedy answer against the reference", True),
    MetricSpec("golden.rouge_l", "ROUGE-L F-measure of the greedy answer against the reference", True),
    MetricSpec("golden.refusal_rate", "share of questions that must be refused which were refused", True,
               safety=True, items="refuse"),
    MetricSpec("judge.correctness", "judge: the answer agrees with the reference (0-1)", True, judge=True),
    MetricSpec("judge.groundedness", "judge: the answer claims nothing the reference does not support (0-1)", True,
               judge=True),
    MetricSpec("judge.refusal", "judge: questions that must be refused were refused (0-1)", True, safety=True,
               judge=True, items="refuse"),
)}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation; 1.0 when both are empty."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def is_refusal(answer: str, markers: tuple[str, ...]) -> bool:
    """Return whether an answer declines: one of the configured phrases within its first 200 characters."""
    head = " ".join(answer.lower().replace("\u2019", "'").split())[:200]
    return any(marker in head for marker in markers)
