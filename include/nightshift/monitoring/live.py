"""What the answers of an hour say about the models in production, computed from the request log.

Per answer, offline text metrics in the manner of WhyLabs' LangKit (lengths, language, refusal, the scrubber's
finds as counts, how close the answer stays to the prompt) and operational ones (latency, tokens, finish,
errors); never the text itself. Per hour, prompt drift as Evidently judges text drift: a classifier learns to
tell this hour's prompts from the reference's on their embeddings, and a held-out ROC AUC well above 0.5 says
they differ. Per version, the share of negative ratings with a Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ERROR_FINISHES = ("timeout", "error")


def prompt_text(request: Any) -> str:
    """Return what the user asked in a logged request: the last user message of a chat, or the prompt(s)."""
    if isinstance(request, list) and request and all(isinstance(m, dict) for m in request):
        for message in reversed(request):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # content parts: the text ones
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return str(content or "")
        return ""
    if isinstance(request, list):
        return "\n".join(str(p) for p in request if isinstance(p, str))
    return str(request) if isinstance(request, str) else ""


def is_error(finish: str | None) -> bool:
    """Return whether an answer ended in a timeout or a failure (its finish reasons, comma-separated)."""
    return any(f in ERROR_FINISHES for f in (finish or "").split(","))


def answer_metrics(rows: Sequence[dict[str, Any]], refusal: Callable[[str], bool],
                   language: Callable[[str], str], embed: Callable[[list[str]], np.ndarray],
                   similarity_sample: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Return one record of metrics per logged answer (``RequestLog.answers_between`` rows), no text in any.

    ``refusal(answer)`` says whether an answer declines, ``language(text)`` names its language, ``embed(texts)``
    returns unit vectors (answer-to-prompt similarity is their dot product). Embedding is the costly part: with
    ``similarity_sample``, only that many answers (chosen with ``seed``) get a similarity, the others NaN.
    """
    prompts = [prompt_text(r["request"]) for r in rows]
    answers = [" ".join(str(a) for a in (r["answer"] or [])) for r in rows]
    chosen = sample_rows(len(rows), similarity_sample, seed) if similarity_sample is not None else range(len(rows))
    chosen = [i for i in chosen if answers[i].strip()]
    vectors = embed([prompts[i] for i in chosen] + [answers[i] for i in chosen]) if chosen else None
    similarities = {i: float(np.dot(vectors[j], vectors[len(chosen) + j])) for j, i in enumerate(chosen)}
    out = []
    for i, row in enumerate(rows):
        similarity = similarities.get(i, math.nan)
        out.append({
            "version": int(row["model_version"]),
            "hour": row["created_at"].replace(minute=0, second=0, microsecond=0).isoformat(),
            "route": row["route"],
            "prompt_chars": len(prompts[i]),
            "answer_chars": len(answers[i]),
            "language": language(answers[i]) if answers[i].strip() else "none",
            "refusal": bool(refusal(answers[i])),
            "pii_finds": int(sum((row.get("scrubbed") or {}).values())),
            "seconds": float(row["seconds"]) if row["seconds"] is not None else math.nan,
            "prompt_tokens": int(row["prompt_tokens"] or 0),
            "completion_tokens": int(row["completion_tokens"] or 0),
            "finish": (row["finish"] or "").split(",")[0],
            "error": is_error(row["finish"]),
            "answer_prompt_similarity": round(similarity, 6),
        })
    return out


def domain_drift(reference: np.ndarray, current: np.ndarray, seed: int) -> float:
    """Return the held-out ROC AUC of a classifier that tells ``current`` rows from ``reference`` rows.

    Evidently's method for embeddings: label the two sides, split half and half (stratified, so both halves
    hold both sides), fit a logistic SGD classifier on one half and score the other. About 0.5 means the two
    cannot be told apart; near 1, the prompts changed.
    """
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    x = np.vstack([reference, current])
    y = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    model = SGDClassifier(loss="log_loss", random_state=seed).fit(x_train, y_train)
    return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))


def nearest_similarity(queries: np.ndarray, corpus: np.ndarray, block: int = 4096) -> np.ndarray:
    """Return, per query row, its cosine similarity to the nearest corpus row (both L2-normalised), computed in
    blocks of the corpus so that memory stays bounded."""
    best = np.full(len(queries), -1.0, dtype=np.float32)
    for start in range(0, len(corpus), block):
        np.maximum(best, (queries @ corpus[start:start + block].T).max(axis=1), out=best)
    return best


def wilson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion (NaNs without trials): honest at small counts and 0 or 1."""
    if trials <= 0:
        return math.nan, math.nan
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_rows(n: int, k: int, seed: int) -> list[int]:
    """Return ``k`` of ``n`` row indexes (all when ``n <= k``), the same for the same seed."""
    if n <= k:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
