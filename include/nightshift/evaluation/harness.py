"""One evaluation harness for every model: perplexities, bits per byte, greedy answers and their metrics, the
judge's scores.

Candidate and champion go through ``evaluate_model`` with the same suite (golden items, generation
settings, judge), so their per-example values pair up for the bootstrap (compare.py). Every model reads
text with its own tokenizer: perplexities per token compare only between models that share one (the report
records its fingerprint), bits per UTF-8 byte compare between any two.
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
from nightshift.prompts.template import PromptTemplate
from nightshift.records import EvaluationReport
from nightshift.training.data import read_heldout_text, tokenizer_fingerprint

log = logging.getLogger(__name__)

__all__ = ["GoldenItem", "evaluate_model", "load_golden", "heldout_nll", "text_nll", "load_check"]


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


HELDOUT_PIECE_BYTES = 128
"""Held-out text is resampled in pieces of this many UTF-8 bytes (about 32 tokens of an English BPE): a block
bootstrap over the same pieces of text for every model, whatever its tokenizer. A token counts in the piece
its first byte lies in."""


def round_trips(tokenizer, text: str, ids: list[int]) -> bool:
    """Return whether ``ids`` spell ``text`` exactly: no unknown token, and decoding gives back every character.

    Bits per byte divide a model's loss by the bytes of the text; a tokenizer that reads text as [UNK], or
    whose normaliser drops or folds characters, would be credited with bytes its model never predicted.
    """
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        return False
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def not_round_tripping(label: str, failed: int, total: int) -> str:
    """Return why a model's bits per byte are not measured when its tokenizer does not spell the text back."""
    return (f"the {label}'s tokenizer does not round-trip the text ({failed} of {total} pieces): bits per byte "
            "would count bytes it never predicted")


def context_tokens(model) -> int:
    """Return how many tokens the model reads at once (its position limit)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def text_nll(model, tokenizer, texts: list[str], piece_bytes: int = HELDOUT_PIECE_BYTES,
             batch_size: int = 4) -> dict[str, list[float] | list[int]]:
    """Return per ``piece_bytes`` piece of every text: summed NLL (nats), tokens and UTF-8 bytes scored; and
    ``unspelled``, how many of the ``texts`` the tokenizer does not round-trip (bits per byte would mean nothing).

    Each text is tokenized by the model's own tokenizer and read after its end-of-sequence token (the
    document separator of training; else its beginning-of-sequence token), so its first token is scored
    too. A text longer than the model's context is read in consecutive parts that each fit, each after that
    token again: every byte is scored by every model, a short context only loses context at the cuts.
    """
    import torch

    start_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start_id is None:
        raise ValueError("the tokenizer has neither an end- nor a beginning-of-sequence token to start a text with")
    limit = max(context_tokens(model) - 1, 1)
    nll: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    scored: list[np.ndarray] = []
    parts: list[tuple[int, list[int], np.ndarray]] = []  # (text, token ids, piece of each token)
    unspelled = 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if not size:
            continue
        try:
            enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            ids, starts = enc["input_ids"], [start for start, _end in enc["offset_mapping"]]
        except NotImplementedError:  # a slow tokenizer has no offsets: its tokens all count in the first piece
            ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            starts = [0] * len(ids)
        unspelled += not round_trips(tokenizer, text, ids)
        # Offsets count characters, pieces count bytes.
        byte_at = np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text])]).astype(np.int64)
        pieces = -(-size // piece_bytes)
        where = np.minimum(byte_at[np.asarray(starts, dtype=np.int64)] // piece_bytes, pieces - 1)
        index = len(nll)
        nll.append(np.zeros(pieces))
        tokens.append(np.zeros(pieces, dtype=np.int64))
        # Every byte counts, also of a text the tokenizer makes nothing of: ``unspelled`` marks such a model.
        scored.append(np.minimum(piece_bytes, size - piece_bytes * np.arange(pieces)))
        for at in range(0, len(ids), limit):
            parts.append((index, [start_id, *ids[at : at + limit]], where[at : at + limit]))

    for at in range(0, len(parts), batch_size):
        batch = parts[at : at + batch_size]
        width = max(len(ids) for _i, ids, _w in batch)
        # Right padding: a causal model's real positions never attend to the padding after them.
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (_i, ids, _w) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, 1 : len(ids)] = torch.tensor(ids[1:])
        loss, _scored = _token_nll(model, input_ids, labels)
        for row_loss, (index, ids, where) in zip(loss, batch, strict=True):
            values = row_loss[: len(ids) - 1].double().numpy()
            nll[index] += np.bincount(where, weights=values, minlength=len(nll[index]))
            tokens[index] += np.bincount(where, minlength=len(tokens[index]))
    return {"nll": [float(v) for a in nll for v in a], "tokens": [int(v) for a in tokens for v in a],
            "bytes": [int(v) for a in scored for v in a], "unspelled": unspelled, "texts": len(nll)}


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


def bits_per_byte(total_nll: float, count: int) -> float:
    """Return the bits per UTF-8 byte of a summed NLL in nats over ``count`` bytes."""
    if count == 0:
        raise ValueError("nothing to evaluate: zero bytes")
    return total_nll / math.log(2) / count


def _prompt_ids(tokenizer, question: str, prompt: PromptTemplate | None = None) -> list[int]:
    """Return the ids a model reads before answering ``question``: the chat template over the prompt template's
    messages (system prompt, examples) and the question; without a chat template, the same as plain text."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(prompt.apply(messages) if prompt else messages,
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    preamble = ""
    if prompt is not None:
        system, *turns = prompt.preamble()
        preamble = system["content"] + "\n\n" + "".join(
            f"Question: {turns[i]['content']}\nAnswer: {turns[i + 1]['content']}\n\n" for i in range(0, len(turns), 2))
    return tokenizer(f"{preamble}Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]


def answer_losses(model, tokenizer, item: GoldenItem, prompt: PromptTemplate | None = None) -> list[float]:
    """Return the NLL of every token of the reference answer given the question, the end of sequence last."""
    return _answer_losses(model, tokenizer, item, prompt)[0]


def _answer_losses(model, tokenizer, item: GoldenItem,
                   prompt: PromptTemplate | None = None) -> tuple[list[float], bool]:
    """Return the losses of ``answer_losses`` and whether the tokenizer round-trips the reference answer."""
    import torch

    prompt_ids = _prompt_ids(tokenizer, item.question, prompt)
    # split_special_tokens: text that spells a control token ("<|endoftext|>") is read as the text it is, so it
    # is scored as text and cannot pose as the unknown token (SmolLM2's unknown token is its end of text).
    ids = tokenizer(item.answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    answer = [*ids, tokenizer.eos_token_id]
    loss, scored = _token_nll(model, torch.tensor([prompt_ids + answer]),
                              torch.tensor([[-100] * len(prompt_ids) + answer]))
    return loss[0][scored[0]].tolist(), round_trips(tokenizer, item.answer, ids)


def answer_nll(model, tokenizer, item: GoldenItem) -> tuple[float, int]:
    """Return the summed NLL of the reference answer (and end of sequence) given the question, and its length."""
    losses = answer_losses(model, tokenizer, item)
    return float(sum(losses)), len(losses)


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int, prompt: PromptTemplate | None = None) -> str:
    import torch

    ids = _prompt_ids(tokenizer, question, prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def check_prompt_fits(model, tokenizer, prompt: PromptTemplate, golden: list[GoldenItem], max_new_tokens: int) -> None:
    """Raise ValueError when the prompt template with a golden question and the answer does not fit the model's
    context window (the message names the numbers to change)."""
    window = context_tokens(model)
    longest = max(len(_prompt_ids(tokenizer, item.question, prompt)) for item in golden)
    if longest + max_new_tokens > window:
        raise ValueError(f"prompt {prompt.name}: with the longest golden question it is {longest} tokens, and "
                         f"answers take up to {max_new_tokens}: more than the model's window of {window} tokens; "
                         "shorten the system prompt or its examples")


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
    judge: Judge | None = None, judge_note: str = "", heldout_text: Path | None = None,
    prompt: PromptTemplate | None = None,
) -> EvaluationReport:
    """Evaluate one checkpoint; every model of a gate decision goes through this same function.

    ``prompt``: the prompt template (system prompt, examples) the model answers under, as the endpoint applies
    it; None: the bare chat template. It changes the golden answers and their metrics, not the held-out text.

    ``heldout_text`` (the held-out documents as text) is read with the model's own tokenizer for both
    held-out metrics; without it, ``heldout_path`` (token blocks) gives the perplexity alone, and only to a
    model whose vocabulary holds its ids.
    """
    started = time.monotonic()
    model, tokenizer = load(model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if prompt is not None:
        check_prompt_fits(model, tokenizer, prompt, golden, suite.max_new_tokens)
    wanted = set(suite.metrics)
    values: dict[str, float] = {}
    unmeasured: dict[str, str] = {}
    heldout = _heldout(model, tokenizer, wanted, heldout_path, heldout_text, label)
    if sum(heldout.get("tokens", [])) and "heldout.perplexity" in wanted:
        values["heldout.perplexity"] = perplexity(sum(heldout["nll"]), sum(heldout["tokens"]))
    if heldout.get("unspelled") and "heldout.bits_per_byte" in wanted:
        unmeasured["heldout.bits_per_byte"] = not_round_tripping(label, heldout["unspelled"], heldout["texts"])
    elif sum(heldout.get("bytes", [])) and "heldout.bits_per_byte" in wanted:
        values["heldout.bits_per_byte"] = bits_per_byte(sum(heldout["nll"]), sum(heldout["bytes"]))

    examples: list[dict[str, Any]] = []
    generate = wanted & {"golden.exact_match", "golden.token_f1", "golden.rouge_l", "golden.refusal_rate",
                         "golden.leak_rate", "golden.format_rate"} or suite.uses_judge
    unspelled = 0
    # Every item's planted secrets are checked in every answer: a model that answers one question with another
    # item's password leaks it just the same.
    planted = tuple(dict.fromkeys(secret for item in golden for secret in item.must_not_contain))
    for i, item in enumerate(golden, start=1):
        example: dict[str, Any] = {"id": item.id, "question": item.question, "reference": item.answer,
                                   "expect": item.expect}
        if wanted & {"golden.perplexity", "golden.bits_per_byte"}:
            losses, spelled = _answer_losses(model, tokenizer, item, prompt)
            unspelled += item.expect == "answer" and not spelled
            example["nll"], example["tokens"] = float(sum(losses)), len(losses)
            # Bits per byte count the answer's own bytes: the end-of-sequence token is no byte of it.
            example["answer_nll"], example["bytes"] = float(sum(losses[:-1])), len(item.answer.encode("utf-8"))
        if generate:
            answer = greedy_answer(model, tokenizer, item.question, suite.max_new_tokens, prompt)
            example.update(score_answer(item, answer, suite.refusal_markers, planted, suite.format_of(item)))
        examples.append(example)
        if i % 4 == 0 or i == len(golden):
            log.info("%s: %d/%d golden items (%.0fs)", label, i, len(golden), time.monotonic() - started)

    judged = judge_examples(judge if suite.uses_judge else None, golden, examples, label, judge_note)
    values.update(aggregate(examples, wanted))
    if unspelled and "golden.bits_per_byte" in wanted:
        unmeasured["golden.bits_per_byte"] = not_round_tripping(
            label, unspelled, sum(item.expect == "answer" for item in golden))
    # Wanted but not measurable for this model: NaN in the metrics, the reason beside it.
    values.update(dict.fromkeys(unmeasured, math.nan))
    report = EvaluationReport(
        model=label, metrics=values, heldout_tokens=int(sum(heldout.get("tokens", []))), golden_items=len(golden),
        examples=examples, heldout=heldout, judge=judged, seconds=round(time.monotonic() - started, 2),
        tokenizer=fingerprint, unmeasured=unmeasured,
    )
    log.info("%s: %s (%.1fs)", label, ", ".join(f"{k} {v:.4g}" for k, v in values.items()), report.seconds)
    return report


def judge_examples(judge: Judge | None, golden: list[GoldenItem], examples: list[dict[str, Any]], label: str,
                   note: str = "") -> dict[str, Any]:
    """Have the judge score every example's answer (each example gets ``judge``: its scores, or None when
    unscored); return the judge's model and counts, or why there was no judge."""
    if judge is None:
        return {"enabled": False, "note": note or "no judge configured"}
    judge.stats = JudgeStats()
    scores = judge.score_all([(item, ex["answer"]) for item, ex in zip(golden, examples, strict=True)])
    for ex, score in zip(examples, scores, strict=True):
        # An answer that gives away what it must not is no refusal, whatever its wording.
        ex["judge"] = None if score is None else {
            "correctness": score.correctness, "groundedness": score.groundedness,
            "refused": bool(score.refused) and not ex.get("leaked", False)}
    log.info("%s: judge %s scored %d of %d answers (%d from cache, %d timeouts, %d errors, %d malformed)",
             label, judge.model, judge.stats.scored, len(golden), judge.stats.cached, judge.stats.timeouts,
             judge.stats.errors, judge.stats.malformed)
    return {"enabled": True, "model": judge.model, **judge.stats.to_dict()}


def _heldout(model, tokenizer, wanted: set[str], blocks: Path | None, text: Path | None,
             label: str) -> dict[str, Any]:
    """Return the held-out scores of one model (see EvaluationReport.heldout), or a note why there are none."""
    if not wanted & {"heldout.perplexity", "heldout.bits_per_byte"}:
        return {}
    if text is not None:
        scores = text_nll(model, tokenizer, read_heldout_text(text))
        log.info("%s: held-out text, %d tokens over %d bytes", label, sum(scores["tokens"]), sum(scores["bytes"]))
        return {**scores, "piece_bytes": HELDOUT_PIECE_BYTES}
    if blocks is None:
        return {"note": "no held-out split"}
    if "heldout.perplexity" not in wanted:
        return {"note": "the held-out split was packed without its text"}
    ids = np.load(blocks)
    if ids.size and int(ids.max()) >= model.get_input_embeddings().num_embeddings:
        return {"note": "the held-out blocks were packed by another tokenizer"}
    nll, tokens = heldout_nll(model, ids)
    log.info("%s: held-out blocks, %d tokens", label, sum(tokens))
    return {"nll": nll, "tokens": tokens, "chunk_tokens": HELDOUT_CHUNK_TOKENS,
            "note": "the held-out split was packed without its text"}


def score_answer(item: GoldenItem, answer: str, markers: tuple[str, ...], planted: tuple[str, ...],
                 form: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the answer with its scores: refused, leaked, whether it keeps to ``form`` (the suite's language and
    the item's format; ``format_ok``, with the rule it broke), and for items to answer exact match, token F1 and
    ROUGE-L. ``planted``: every ``must_not_contain`` string of the whole golden set; with any, ``leaked`` says
    whether the answer holds one. A leak is never a refusal, and every stretch of the
    answer that reads as a planted string is replaced by ``metrics.REDACTED``; the scores are those of the answer
    as given."""
    leaked = m.leaks(answer, planted)
    # Only the redacted answer is kept: examples travel to the judge, reports, MLflow, XCom and the run page.
    out: dict[str, Any] = {"answer": m.redact(answer, planted) if leaked else answer}
    if planted:
        out["leaked"] = leaked
    out["refused"] = (m.is_refusal(answer, markers) and not leaked) if markers else None
    if form:
        ok, broken = m.follows_format(answer, form)
        out["format_ok"] = ok
        if broken:
            out["format_broken"] = broken
    if item.expect == "answer":
        out["exact_match"] = m.exact_match(answer, item.answer)
        out["token_f1"] = m.token_f1(answer, item.answer)
        out["rouge_l"] = m.rouge_l(answer, item.answer)
    return out


def per_example(examples: list[dict[str, Any]], metric: str) -> tuple[list[str], list[float | None]]:
    """Return (ids, values) of a mean-type metric over the items it is defined on; None where unscored."""
    if metric == "golden.refusal_rate":
        rows = [e for e in examples if e["expect"] == "refuse"]
        return [e["id"] for e in rows], [None if e.get("refused") is None else float(e["refused"]) for e in rows]
    if metric == "golden.format_rate":
        rows = [e for e in examples if "format_ok" in e]
        return [e["id"] for e in rows], [float(e["format_ok"]) for e in rows]
    if metric == "golden.leak_rate":
        rows = [e for e in examples if "leaked" in e]
        return [e["id"] for e in rows], [float(e["leaked"]) for e in rows]
    if metric == "judge.refusal":
        rows = [e for e in examples if e["expect"] == "refuse"]
        return [e["id"] for e in rows], [None if not e.get("judge") else
                                         float(e["judge"]["refused"] and not e.get("leaked")) for e in rows]
    rows = [e for e in examples if e["expect"] == "answer"]
    if metric.startswith("judge."):
        key = metric.split(".", 1)[1]
        return [e["id"] for e in rows], [None if not e.get("judge") else float(e["judge"][key]) for e in rows]
    key = metric.split(".", 1)[1]
    return [e["id"] for e in rows], [e.get(key) for e in rows]


RATES = {"heldout.perplexity", "heldout.bits_per_byte", "golden.perplexity", "golden.bits_per_byte"}
"""Metrics that are rates over tokens or bytes, not means over examples."""


def aggregate(examples: list[dict[str, Any]], wanted: set[str]) -> dict[str, float]:
    """Return the golden set's value of every wanted metric it measured."""
    out: dict[str, float] = {}
    answers = [e for e in examples if e["expect"] == "answer" and "nll" in e]
    if "golden.perplexity" in wanted and answers:
        out["golden.perplexity"] = perplexity(sum(e["nll"] for e in answers), sum(e["tokens"] for e in answers))
    if "golden.bits_per_byte" in wanted and sum(e["bytes"] for e in answers):
        out["golden.bits_per_byte"] = bits_per_byte(sum(e["answer_nll"] for e in answers),
                                                    sum(e["bytes"] for e in answers))
    for metric in sorted(wanted - RATES):
        _ids, vals = per_example(examples, metric)
        scored = [v for v in vals if v is not None]
        if scored:
            out[metric] = float(np.mean(scored))
    return out
