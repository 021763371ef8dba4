"""The grounded prompt: retrieved chunks, numbered, within a token budget, before the question.

Serving and evaluation put the same words around the same chunks, so what the evaluation measured is what the
endpoint answers with. A chunk that does not fit whole is cut at a token boundary and marked cut; the chunks
after it are left out and marked so in the citations, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nightshift.retrieval.store import Hit

INSTRUCTIONS = ("Answer the question using only the numbered documents below. Cite the documents you use by "
                "their number in brackets, like [1]. If the documents do not hold the answer, say so.")
CONTROL_MARKUP = re.compile(r"<\|[^<>|\n]{1,64}\|>")
"""Chat-template control markup (``<|im_start|>``, ``<|eot_id|>``): removed from documents even when the answering
model's tokenizer is not here (an engine's), so a document cannot open a turn of its own."""
JOIN_SLACK = 2
"""Tokens allowed per block for the merges a tokenizer makes across a block's edges when the blocks are joined."""
MIN_CUT_TOKENS = 24
"""A chunk is cut to fit only when at least this many of its tokens still fit; else it is left out."""


@dataclass(frozen=True)
class Grounding:
    prompt: str
    """The question with the documents before it (the question alone when no chunk was used)."""
    citations: list[dict]
    """One per retrieved chunk: number (as cited in the prompt; None when left out), document and chunk ids, score,
    and ``used``: ``whole``, ``cut`` (to fit the budget) or ``left_out``."""
    context_tokens: int


def special_tokens(tokenizer) -> list[str]:
    """The strings a tokenizer reads as control tokens (its special tokens and added special tokens)."""
    if tokenizer is None:
        return []
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False) and getattr(added, "content", ""):
            found.add(added.content)
    return sorted(found)


def defused(text: str, special: Sequence[str] = ()) -> str:
    """Return document text with the answering model's special tokens and chat control markup taken out: a
    document is text inside a user turn, never turns of its own."""
    for token in sorted((t for t in special if t), key=len, reverse=True):
        text = text.replace(token, "")
    return CONTROL_MARKUP.sub("", text)


def ground(question: str, hits: list[Hit], min_score: float, budget: int,
           tokenize: Callable[[str], list[int]], detokenize: Callable[[list[int]], str],
           special: Sequence[str] = ()) -> Grounding:
    """Return the grounded prompt for ``question`` from ``hits`` (best first), spending at most ``budget`` tokens
    of the answering model on the documents. ``special``: the model's special tokens, removed from documents."""
    used: list[str] = []
    citations: list[dict] = []
    spent = 0
    full = False
    for hit in hits:
        if hit.score < min_score:
            continue
        try:
            (hit.doc_id + hit.chunk_id + hit.text).encode("utf-8")
        except UnicodeEncodeError:  # not plain Unicode (an index written before such text was refused): unused
            continue
        citation = {"number": None, "document": hit.doc_id, "chunk": hit.chunk_id, "score": round(hit.score, 4),
                    "used": "left_out"}
        citations.append(citation)
        if full:
            continue
        doc_id, text = defused(hit.doc_id, special), defused(hit.text, special)
        number = len(used) + 1
        block = f"[{number}] ({doc_id}) {text}"
        cost = len(tokenize(block + "\n\n")) + JOIN_SLACK
        if spent + cost <= budget:
            citation["used"] = "whole"
        elif budget - spent >= MIN_CUT_TOKENS:
            ids = tokenize(text)
            keep = budget - spent - len(tokenize(f"[{number}] ({doc_id})  [...]\n\n")) - JOIN_SLACK
            while keep > 0:
                block = f"[{number}] ({doc_id}) " + defused(detokenize(ids[:keep]), special).rstrip() + " [...]"
                cost = len(tokenize(block + "\n\n")) + JOIN_SLACK
                if spent + cost <= budget:
                    break
                keep -= max(1, (spent + cost - budget))
            full = True
            if keep <= 0:
                continue
            citation["used"] = "cut"
        else:
            full = True
            continue
        citation["number"] = number
        used.append(block)
        spent += cost
    if not used:
        return Grounding(question, citations, 0)
    prompt = INSTRUCTIONS + "\n\n" + "\n\n".join(used) + f"\n\nQuestion: {question}"
    return Grounding(prompt, citations, spent)
