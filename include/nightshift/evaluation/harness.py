"""One evaluation harness for every model: perplexities, greedy answers and their metrics, the judge's scores.

Candidate and champion go through ``evaluate_model`` with the same suite (golden items, generation
settings, judge), so their per-example values pair up for the bootstrap (compare.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.evaluation import metrics as m
from nightshift.evaluation.judge import Judge, JudgeStats
from nightshift.evaluation.suite import EvaluationSuite, GoldenItem, load_golden
from nightshift.records import EvaluationReport

log = logging.getLogger(__name__)

__all__ = ["GoldenItem", "evaluate_model", "load_golden", "heldout_nll", "load_check"]


def _token_nll(model, input_ids, labels):
    """Return the next-token negative log-likelihood of every position (rows x len-1) and the scored mask."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(targets.shape)
    return loss, targets != -100


def _nll_sum(model, input_ids, labels) -> tuple[list[float], list[int]]:
    """Return the summed NLL over labels != -100 and their count, per row."""
    loss, scored = _token_nll(model, input_ids, labels)
    return loss.sum(dim=1).tolist(), scored.sum(dim=1).tolist()


HELDOUT_CHUNK_TOKENS = 32
"""The held-out split is resampled in chunks of this many consecutive tokens (a block bootstrap: neighbouring
tokens are correlated, so single tokens would give too narrow an interval, and a small split has too few
whole blocks)."""


def heldout_nll(model, heldout: np.ndarray, batch_size: int = 4,
                chunk: int = HELDOUT_CHUNK_TOKENS) -> tuple[list[float], list[int]]:
    """Return the summed NLL and the token count of every chunk of ``chunk`` scored tokens (-1 marks padding)."""
    import torch

    nll: list[float] = []
    tokens: list[int] = []
    for start in range(0, len(heldout), batch_size):
        rows = torch.as_tensor(heldout[start : start + batch_size].astype(np.int64))
        labels = rows.masked_fill(rows < 0, -100)
        loss, scored = _token_nll(model, rows.clamp(min=0), labels)
        for row_loss, row_scored in zip(loss, scored, strict=True):
            values = row_loss[row_scored]
            for at in range(0, len(values), chunk):
                part = values[at : at + chunk]
                nll.append(float(part.sum()))
                tokens.append(len(part))
    return nll, tokens


def heldout_perplexity(model, heldout: np.ndarray, batch_size: int = 4) -> tuple[float, int]:
    """Return perplexity over every token of the held-out blocks and the token count."""
    nll, tokens = heldout_nll(model, heldout, batch_size)
    return perplexity(sum(nll), sum(tokens)), sum(tokens)


def perplexity(total_nll: float, count: int) -> float:
    if count == 0:
        raise ValueError("nothing to evaluate: zero tokens")
    mean = total_nll / count
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf


def _prompt_ids(tokenizer, question: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]


def answer_nll(model, tokenizer, item: GoldenItem) -> tuple[float, int]:
    """Return the summed NLL of the reference answer (and end of sequence) given the question, and its length."""
    import torch

    prompt = _prompt_ids(tokenizer, item.question)
    answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    sums, counts = _nll_sum(model, torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer]))
    return sums[0], counts[0]


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    import torch

    prompt = _prompt_ids(tokenizer, question)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


def load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tokenizer


def load_check(model_dir: Path) -> dict[str, Any]:
    """Load a checkpoint with transformers and answer one question: raise if it cannot, return what it did."""
    started = time.monotonic()
    model, tokenizer = load(model_dir)
    item = GoldenItem("Hello", "Hello.")
    nll, tokens = answer_nll(model, tokenizer, item)
    if not math.isfinite(nll):
        raise ValueError(f"the model in {model_dir.name} gives a non-finite loss")
    greedy_answer(model, tokenizer, item.question, 4)
    return {"loss": nll / max(tokens, 1), "seconds": round(time.monotonic() - started, 2)}


def evaluate_model(
    model_dir: Path, label: str, heldout_path: Path | None, suite: EvaluationSuite, golden: list[GoldenItem],
    judge: Judge | None = None, judge_note: str = "",
) -> EvaluationReport:
    """Evaluate one checkpoint; every model of a gate decision goes through this same function."""
    started = time.monotonic()
    model, tokenizer = load(model_dir)
    wanted = set(suite.metrics)
    values: dict[str, float] = {}
    heldout: dict[str, list[float]] = {}
    if "heldout.perplexity" in wanted and heldout_path is not None:
        nll, tokens = heldout_nll(model, np.load(heldout_path))
        heldout = {"nll": nll, "tokens": tokens, "chunk_tokens": HELDOUT_CHUNK_TOKENS}
        values["heldout.perplexity"] = perplexity(sum(nll), sum(tokens))
        log.info("%s: held-out perplexity %.3f over %d tokens", label, values["heldout.perplexity"], sum(tokens))

    examples: list[dict[str, Any]] = []
    generate = wanted & {"golden.exact_match", "golden.token_f1", "golden.rouge_l", "golden.refusal_rate"} \
        or suite.uses_judge
    for i, item in enumerate(golden, start=1):
        example: dict[str, Any] = {"id": item.id, "question": item.question, "reference": item.answer,
                                   "expect": item.expect}
        if "golden.perplexity" in wanted:
            example["nll"], example["tokens"] = answer_nll(model, tokenizer, item)
        if generate:
            answer = greedy_answer(model, tokenizer, item.question, suite.max_new_tokens)
            example["answer"] = answer
            example["refused"] = m.is_refusal(answer, suite.refusal_markers) if suite.refusal_markers else None
            if item.expect == "answer":
                example["exact_match"] = m.exact_match(answer, item.answer)
                example["token_f1"] = m.token_f1(answer, item.answer)
                example["rouge_l"] = m.rouge_l(answer, item.answer)
        examples.append(example)
        if i % 4 == 0 or i == len(golden):
            log.info("%s: %d/%d golden items (%.0fs)", label, i, len(golden), time.monotonic() - started)

    judged: dict[str, Any] = {"enabled": False, "note": judge_note or "no judge configured"}
    if suite.uses_judge and judge is not None:
        judge.stats = JudgeStats()
        scores = judge.score_all([(item, ex["answer"]) for item, ex in zip(golden, examples, strict=True)])
        for ex, score in zip(examples, scores, strict=True):
            ex["judge"] = None if score is None else {"correctness": score.correctness,
                                                      "groundedness": score.groundedness, "refused": score.refused}
        judged = {"enabled": True, "model": judge.model, **judge.stats.to_dict()}
        log.info("%s: judge %s scored %d of %d answers (%d from cache, %d timeouts, %d errors, %d malformed)",
                 label, judge.model, judge.stats.scored, len(golden), judge.stats.cached, judge.stats.timeouts,
                 judge.stats.errors, judge.stats.malformed)

    values.update(aggregate(examples, wanted))
    report = EvaluationReport(
        model=label, metrics=values, heldout_tokens=int(sum(heldout.get("tokens", []))), golden_items=len(golden),
        examples=examples, heldout=heldout, judge=judged, seconds=round(time.monotonic() - started, 2),
    )
    log.info("%s: %s (%.1fs)", label, ", ".join(f"{k} {v:.4g}" for k, v in values.items()), report.seconds)
    return report


def per_example(examples: list[dict[str, Any]], metric: str) -> tuple[list[str], list[float | None]]:
    """Return (ids, values) of a mean-type metric over the items it is defined on; None where unscored."""
    if metric == "golden.refusal_rate":
        rows = [e for e in examples if e["expect"] == "refuse"]
        return [e["id"] for e in rows], [None if e.get("refused") is None else float(e["refused"]) for e in rows]
    if metric == "judge.refusal":
        rows = [e for e in examples if e["expect"] == "refuse"]
        return [e["id"] for e in rows], [None if not e.get("judge") else float(e["judge"]["refused"]) for e in rows]
    rows = [e for e in examples if e["expect"] == "answer"]
    if metric.startswith("judge."):
        key = metric.split(".", 1)[1]
        return [e["id"] for e in rows], [None if not e.get("judge") else float(e["judge"][key]) for e in rows]
    key = metric.split(".", 1)[1]
    return [e["id"] for e in rows], [e.get(key) for e in rows]


def aggregate(examples: list[dict[str, Any]], wanted: set[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "golden.perplexity" in wanted and examples and "nll" in examples[0]:
        out["golden.perplexity"] = perplexity(sum(e["nll"] for e in examples if e["expect"] == "answer"),
                                              sum(e["tokens"] for e in examples if e["expect"] == "answer"))
    for metric in sorted(wanted - {"heldout.perplexity", "golden.perplexity"}):
        _ids, vals = per_example(examples, metric)
        scored = [v for v in vals if v is not None]
        if scored:
            out[metric] = float(np.mean(scored))
    return out
