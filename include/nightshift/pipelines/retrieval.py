"""Whether retrieval, fine-tuning or both help: the golden items that name their source documents, answered by the
base and the fine-tuned model, each with and without the chunks the index retrieves for the question.

Every variant goes through the evaluation harness (the same greedy answers, metrics and judge as the gate); each is
compared with the fine-tuned model alone by paired bootstrap intervals. Retrieval itself is scored by recall@k: the
share of an item's source documents among the documents of its top-k chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from nightshift.evaluation.compare import compare
from nightshift.evaluation.harness import evaluate_model
from nightshift.evaluation.judge import Judge, JudgeEndpoint
from nightshift.evaluation.suite import EvaluationSuite, GoldenItem
from nightshift.records import json_safe
from nightshift.reports.publish import RunRef
from nightshift.settings import Settings

log = logging.getLogger(__name__)

ANSWER_METRICS = ("golden.token_f1", "golden.rouge_l", "golden.exact_match", "judge.correctness",
                  "judge.groundedness")
VARIANTS = ("base", "fine-tuned", "base+RAG", "fine-tuned+RAG")


def retrieval_recall(items: list[GoldenItem], retrieved: dict[str, list[str]]) -> list[float]:
    """Per item, the share of its source documents among the documents retrieved for it."""
    return [len(set(item.sources) & set(retrieved[item.id])) / len(set(item.sources)) for item in items]


def grounded_items(items: list[GoldenItem], hits: dict[str, list], tokenizer, window: int, suite: EvaluationSuite,
                   config) -> tuple[list[GoldenItem], dict[str, list[dict]]]:
    """Return the items with their questions grounded in their retrieved chunks, as the endpoint grounds them for
    this model, and each item's citations."""
    from nightshift.retrieval.context import INSTRUCTIONS, ground, special_tokens

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out, citations = [], {}
    for item in items:
        spare = window - suite.max_new_tokens - len(tokenize(INSTRUCTIONS + item.question)) - 96
        grounding = ground(item.question, hits[item.id], config.min_score, max(0, min(config.context_tokens, spare)),
                           tokenize, lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                           special_tokens(tokenizer))
        out.append(dataclasses.replace(item, question=grounding.prompt))
        citations[item.id] = grounding.citations
    return out, citations


def compare_retrieval(settings: Settings, base_dir: Path, candidate_dir: Path, tag: str, suite: EvaluationSuite,
                      judge_endpoint: JudgeEndpoint | None = None, judge_note: str = "",
                      run: RunRef | None = None) -> dict[str, Any]:
    """Answer the golden items that name their sources four ways; return (and publish) the comparison.

    Returns ``{"skipped": why}`` when retrieval.yaml says not to, no item names its sources, or the version has no
    index for the embedding model."""
    from nightshift.embeddings import embedder
    from nightshift.retrieval.config import RetrievalConfig
    from nightshift.retrieval.store import open_store

    config = RetrievalConfig.load(settings.retrieval_config)
    result: dict[str, Any]
    items = [item for item in suite.golden() if item.sources and item.expect == "answer"]
    model = embedder() if config.evaluate and items else None
    store = open_store(settings.vector_store, settings.home, config) if model else None
    if not config.evaluate:
        result = {"skipped": "retrieval.yaml says evaluate: false"}
    elif not items:
        result = {"skipped": "no golden item names its source documents (`sources`)"}
    elif store.manifest(tag, model.key) is None:
        result = {"skipped": f"no index of {tag} for the embedding model (ingest_corpus builds it)"}
    else:
        result = _compare(base_dir, candidate_dir, tag, suite, items, config, store, model, judge_endpoint, judge_note,
                          settings)
    if run:
        run.publish({"retrieval": json_safe(result)})
    return json_safe(result)


def _compare(base_dir, candidate_dir, tag, suite, items, config, store, model, judge_endpoint, judge_note,
             settings) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    metrics = tuple(m for m in ANSWER_METRICS if m in suite.metrics) or ("golden.token_f1",)
    sub = dataclasses.replace(suite, metrics=metrics)
    vectors = model.embed([item.question for item in items])
    hits = {item.id: store.search(tag, model.key, vectors[i], config.top_k) for i, item in enumerate(items)}
    recall = retrieval_recall(items, {i: [h.doc_id for h in found] for i, found in hits.items()})
    judge = Judge(judge_endpoint, suite.judge, settings.cache_dir / "judge") \
        if sub.uses_judge and judge_endpoint is not None else None
    note = judge_note if sub.uses_judge else "no judge metric in the suite"
    reports, citations = {}, {}
    for name, folder in (("base", base_dir), ("fine-tuned", candidate_dir)):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        window = int(getattr(AutoConfig.from_pretrained(str(folder)), "max_position_embeddings", None) or 2048)
        grounded, citations[name] = grounded_items(items, hits, tokenizer, window, sub, config)
        reports[name] = evaluate_model(folder, name, None, sub, items, judge, note)
        reports[f"{name}+RAG"] = evaluate_model(folder, f"{name}+RAG", None, sub, grounded, judge, note)
    key = metrics[0]
    variants = []
    for name in VARIANTS:
        entry: dict[str, Any] = {"name": name, "metrics": {m: reports[name].metrics.get(m) for m in metrics}}
        if name != "fine-tuned":
            found = {c.metric: c for c in compare(reports[name], reports["fine-tuned"], sub)}
            if key in found and not found[key].unmeasured:
                c = found[key]
                entry["vs_finetuned"] = {"difference": c.difference, "low": c.low, "high": c.high, "n": c.n}
        variants.append(entry)
    scores = {v["name"]: v["metrics"].get(key) for v in variants}
    best = max(VARIANTS, key=lambda n: -math.inf if scores[n] is None or math.isnan(scores[n]) else scores[n])
    best_entry = next(v for v in variants if v["name"] == best)
    interval = best_entry.get("vs_finetuned")
    if best == "fine-tuned":
        best_note = "no variant beat it"
    elif interval and interval["low"] > 0:
        best_note = f"better than fine-tuned alone: its {key} interval lies above 0"
    else:
        best_note = (f"not distinguishable from fine-tuned alone at {suite.bootstrap.confidence:.0%} on "
                     f"{len(items)} items")
    examples = [{"id": item.id, "question": item.question, "sources": list(item.sources),
                 "retrieved": [h.doc_id for h in hits[item.id]], "recall": recall[i],
                 **{f"answer.{n}": next((e.get("answer") for e in reports[n].examples if e["id"] == item.id), None)
                    for n in VARIANTS}}
                for i, item in enumerate(items)]
    result = {"index": tag, "top_k": config.top_k, "items": len(items), "recall_at_k": sum(recall) / len(recall),
              "metrics": list(metrics), "key_metric": key, "variants": variants, "best": best, "best_note": best_note,
              "confidence": suite.bootstrap.confidence, "examples": examples,
              "citations": citations["fine-tuned"]}
    log.info("retrieval recall@%d %.2f over %d items; %s: %s; best %s (%s)", config.top_k, result["recall_at_k"],
             len(items), key, ", ".join(f"{n} {scores[n]:.3f}" for n in VARIANTS if scores[n] is not None), best,
             best_note)
    return result
