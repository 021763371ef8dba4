"""One evaluation harness for every model: held-out perplexity and golden question/answer perplexity."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nightshift.records import EvaluationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoldenItem:
    question: str
    answer: str


def load_golden(path: Path) -> list[GoldenItem]:
    """Return the golden question/answer pairs of a JSONL file with ``question`` and ``answer`` fields."""
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
            raise ValueError(f"{path}:{lineno}: golden items need string fields 'question' and 'answer'")
        items.append(GoldenItem(record["question"], record["answer"]))
    if not items:
        raise ValueError(f"{path} holds no golden items")
    return items


def _nll_sum(model, input_ids, labels) -> tuple[float, int]:
    """Return the summed next-token negative log-likelihood over labels != -100, and their count."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
    return loss.item(), int((targets != -100).sum())


def heldout_perplexity(model, heldout: np.ndarray, batch_size: int = 4) -> tuple[float, int]:
    """Return perplexity over every token of the held-out blocks (-1 marks padding) and the token count."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(heldout), batch_size):
        rows = torch.as_tensor(heldout[start : start + batch_size].astype(np.int64))
        labels = rows.masked_fill(rows < 0, -100)
        nll, n = _nll_sum(model, rows.clamp(min=0), labels)
        total, count = total + nll, count + n
    return _ppl(total, count), count


def golden_perplexity(model, tokenizer, items: list[GoldenItem]) -> float:
    """Return the perplexity of the reference answers given each question in the model's chat format."""
    import torch

    total, count = 0.0, 0
    for item in items:
        prompt = _prompt_ids(tokenizer, item.question)
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        nll, n = _nll_sum(model, ids, labels)
        total, count = total + nll, count + n
    return _ppl(total, count)


def sample_answers(model, tokenizer, items: list[GoldenItem], max_new_tokens: int = 40) -> list[dict[str, str]]:
    """Return greedy answers to the given questions, for people to read next to the metrics."""
    import torch

    samples = []
    for item in items:
        prompt = _prompt_ids(tokenizer, item.question)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
            )
        answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        samples.append({"question": item.question, "reference": item.answer, "answer": answer})
    return samples


def evaluate_model(
    model_dir: Path, label: str, heldout_path: Path, golden: list[GoldenItem], samples: int = 2
) -> EvaluationReport:
    """Evaluate one checkpoint; every model of a gate decision goes through this same function."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    heldout = np.load(heldout_path)
    ppl, tokens = heldout_perplexity(model, heldout)
    golden_ppl = golden_perplexity(model, tokenizer, golden)
    report = EvaluationReport(
        model=label,
        perplexity=ppl,
        heldout_tokens=tokens,
        golden_perplexity=golden_ppl,
        golden_items=len(golden),
        samples=sample_answers(model, tokenizer, golden[:samples]) if samples else [],
        seconds=round(time.monotonic() - started, 2),
    )
    log.info(
        "%s: held-out perplexity %.3f over %d tokens, golden perplexity %.3f over %d items (%.1fs)",
        label, ppl, tokens, golden_ppl, len(golden), report.seconds,
    )
    return report


def _prompt_ids(tokenizer, question: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]


def _ppl(total: float, count: int) -> float:
    if count == 0:
        raise ValueError("nothing to evaluate: zero tokens")
    mean = total / count
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf
