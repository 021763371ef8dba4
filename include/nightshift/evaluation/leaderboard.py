"""Foundation-model candidates side by side: local checkpoints and OpenAI-compatible API models, one harness.

Every candidate answers the golden set of the evaluation suite greedily (the same items, answer length and judge
as the gate's evaluation) and is scored the same way: exact match, token F1, ROUGE-L, format, refusals, leaks,
the judge where one is configured. Bits per byte of the reference answers are read as plain text by every
candidate alike, ``Question: ...\\nAnswer:`` followed by the answer: a local model with its own tokenizer, an API
through ``/v1/completions`` with ``echo`` and ``logprobs`` (where ``foundation.yaml`` says it returns them). Plain
text rather than each model's chat template: chat templates differ between models, and an API's is unknown, so
only the same text gives a number that compares across all of them. Latency is measured per answer; cost per
1,000 tokens comes from the config's prices for an API and from the measured compute seconds at
``local_cost_per_hour`` for a local model. Each candidate is compared with the current base by the paired
bootstrap of compare.py, latency included.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nightshift.configs import read_yaml_mapping
from nightshift.evaluation.compare import compare, mean_difference, paired_bootstrap
from nightshift.evaluation.harness import aggregate, bits_per_byte, greedy_answer, judge_examples, score_answer
from nightshift.evaluation.judge import Judge, JudgeEndpoint
from nightshift.evaluation.metrics import CATALOG
from nightshift.evaluation.suite import EvaluationSuite, GoldenItem
from nightshift.records import EvaluationReport, MetricComparison

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METRICS = ("golden.bits_per_byte", "golden.exact_match", "golden.token_f1", "golden.rouge_l", "golden.refusal_rate",
           "golden.format_rate", "golden.leak_rate", "judge.correctness", "judge.groundedness", "judge.refusal")
"""What a leaderboard compares: the suite's metrics that mean the same for every model (no per-token perplexity,
no held-out split: a foundation model is chosen before there is a dataset to hold out)."""
RANKABLE = tuple(m for m in METRICS if not m.startswith("judge."))
MAX_USAGE_TOKENS = 1_000_000
"""A token count an API reports above this (or below 0) is not believed: its cost is not computed from it."""
MAX_CHARS_PER_TOKEN = 32
"""Answers are cut at this many characters per requested token (an API that ignores max_tokens cannot flood the
page), and prompt logprobs whose tokens average more characters are not believed."""
MAX_ERROR_SHARE = 0.2
"""A candidate that fails on more of the golden questions than this is left off the leaderboard."""


class CandidateFailed(RuntimeError):
    """A candidate failed on too many questions to be compared."""
MAX_CANDIDATES = 32


def plain_prefix(question: str) -> str:
    """Return the text every candidate reads a reference answer after, for bits per byte."""
    return f"Question: {question}\nAnswer:"


# -- configuration --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiCandidate:
    """A model behind an OpenAI-compatible API, named by an Airflow connection."""

    name: str
    """The candidate's name on the leaderboard."""
    connection: str
    """Airflow connection: host (the base URL, or a host with schema, port and extra ``path``), password (the key),
    extra ``model``."""
    model: str | None = None
    """The API's model name; empty: the connection's extra ``model``."""
    price_per_1k_input: float = 0.0
    """What 1,000 prompt tokens cost (in any currency, the same for every candidate)."""
    price_per_1k_output: float = 0.0
    """What 1,000 completion tokens cost."""
    logprobs: bool = False
    """Whether its ``/v1/completions`` returns prompt logprobs (``echo``): then its bits per byte are measured."""


@dataclass(frozen=True)
class FoundationConfig:
    """include/configs/foundation.yaml: which models compete, what they cost, how they are ranked."""

    local: tuple[str, ...] | None = None
    """Folder names under $NIGHTSHIFT_HOME/models; None (``all``): every checkpoint folder there."""
    api: tuple[ApiCandidate, ...] = ()
    local_cost_per_hour: float = 1.0
    """What an hour of this machine's compute costs, for the cost per 1,000 tokens of a local model."""
    rank_by: str = "golden.token_f1"
    """The metric the leaderboard is sorted by (then by cost); the recommendation is the first that is no worse
    than the current base on refusals and leaks."""
    timeout_s: float = 60.0
    """Per API call."""

    @classmethod
    def load(cls, path: Path) -> FoundationConfig:
        path = Path(path)
        data = read_yaml_mapping(path)
        where = path.name
        unknown = sorted(str(k) for k in set(data) - {"local", "api", "local_cost_per_hour", "rank_by", "timeout_s"})
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        local = data.get("local", "all")
        if local == "all" or local is None:
            names = None
        elif isinstance(local, list) and all(isinstance(n, str) and NAME.fullmatch(n) for n in local):
            names = tuple(dict.fromkeys(local))
        else:
            raise ValueError(f"{where}: local must be `all` or a list of folder names under $NIGHTSHIFT_HOME/models")
        raw = data.get("api") or []
        if not isinstance(raw, list):
            raise ValueError(f"{where}: api must be a list of candidates")
        api = tuple(_api(f"{where}: api[{i}]", entry) for i, entry in enumerate(raw, start=1))
        seen = [c.name for c in api] + list(names or ())
        if len(set(seen)) != len(seen):
            raise ValueError(f"{where}: candidate names must be unique (an API candidate may not share a local "
                             "folder's name)")
        cost = data.get("local_cost_per_hour", 1.0)
        if not _number(cost) or cost < 0:
            raise ValueError(f"{where}: local_cost_per_hour must be a number of 0 or more")
        rank = data.get("rank_by", "golden.token_f1")
        if rank not in RANKABLE:
            raise ValueError(f"{where}: rank_by must be one of {list(RANKABLE)}")
        timeout = data.get("timeout_s", 60.0)
        if not _number(timeout) or not 0.1 <= timeout <= 3600:
            raise ValueError(f"{where}: timeout_s must be a number from 0.1 to 3600")
        return cls(names, api, float(cost), rank, float(timeout))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _api(where: str, entry: Any) -> ApiCandidate:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping")
    known = {f.name for f in dataclasses.fields(ApiCandidate)}
    unknown = sorted(str(k) for k in set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
    name, conn = entry.get("name"), entry.get("connection")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}: name must be 1 to 64 letters, digits, '.', '_' or '-'")
    if not isinstance(conn, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,250}", conn):
        raise ValueError(f"{where} ({name}): connection must be an Airflow connection id")
    model = entry.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 250):
        raise ValueError(f"{where} ({name}): model must be a model name, or empty for the connection's extra")
    prices = {}
    for key in ("price_per_1k_input", "price_per_1k_output"):
        value = entry.get(key, 0.0)
        if not _number(value) or value < 0:
            raise ValueError(f"{where} ({name}): {key} must be a number of 0 or more")
        prices[key] = float(value)
    logprobs = entry.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ValueError(f"{where} ({name}): logprobs must be true or false")
    return ApiCandidate(name, conn, model.strip() if model else None, logprobs=logprobs, **prices)


def local_candidates(models_dir: Path, wanted: tuple[str, ...] | None) -> list[str]:
    """Return the checkpoint folders under ``models_dir`` to compete: those named, else every one there.

    A folder named but missing, or not a checkpoint (config.json and safetensors weights), is refused by name."""
    found = sorted(p.name for p in Path(models_dir).iterdir() if _checkpoint(p)) if Path(models_dir).is_dir() else []
    if wanted is None:
        return [n for n in found if NAME.fullmatch(n)]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LookupError(f"foundation.yaml names {', '.join(missing)}, not a checkpoint folder under {models_dir} "
                          "(import it with select_foundation_model's import_from Param)")
    return list(wanted)


def _checkpoint(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / "config.json").is_file() \
        and any(folder.glob("*.safetensors"))


# -- backends -------------------------------------------------------------------------------------------------

@dataclass
class Answered:
    text: str
    seconds: float
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    kind: str
    no_logprobs: str | None
    """Why bits per byte cannot be measured for this candidate at all (None: they can)."""

    def answer(self, question: str, max_tokens: int) -> Answered:
        """Answer greedily; the time it took and the tokens it read and wrote."""

    def answer_nll(self, prefix: str, answer: str) -> float | None:
        """Return the summed NLL (nats) of ``answer`` read after ``prefix``; None when it cannot be measured."""


class LocalBackend:
    """A checkpoint folder, loaded with transformers on this machine."""

    kind = "local"
    no_logprobs = None

    def __init__(self, folder: Path) -> None:
        from nightshift.evaluation.harness import load

        self.model, self.tokenizer = load(folder)
        self.compute_seconds = 0.0
        """Seconds spent answering (what a local model's cost is computed from; scoring is the harness's own work,
        not charged, as an API's prices do not charge it either)."""

    def answer(self, question: str, max_tokens: int) -> Answered:
        from nightshift.evaluation.harness import _prompt_ids

        started = time.monotonic()
        text = greedy_answer(self.model, self.tokenizer, question, max_tokens)
        seconds = time.monotonic() - started
        self.compute_seconds += seconds
        prompt = len(_prompt_ids(self.tokenizer, question))
        written = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Answered(text, seconds, prompt, written)

    def answer_nll(self, prefix: str, answer: str) -> float | None:
        import torch

        from nightshift.evaluation.harness import _token_nll

        text = prefix + answer
        start = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.bos_token_id
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        ids = [start, *enc["input_ids"]]
        loss, _scored = _token_nll(self.model, torch.tensor([ids]), torch.tensor([ids]))
        # loss[0][i] is the NLL of token i + 1 (ids[0] is the start token): text token i.
        return float(sum(float(loss[0][i]) for i, (s, _e) in enumerate(enc["offset_mapping"]) if s >= len(prefix)))


class ApiBackend:
    """A model behind an OpenAI-compatible API (the official ``openai`` client)."""

    kind = "api"

    def __init__(self, endpoint: JudgeEndpoint, candidate: ApiCandidate, timeout_s: float) -> None:
        self.candidate = candidate
        self.no_logprobs = None if candidate.logprobs else "its API returns no prompt logprobs (foundation.yaml: " \
            "logprobs false)"
        self.model = endpoint.model
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.client = self._client()
        self.implausible_usage = 0
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"api-{candidate.name}")

    def _client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.endpoint.base_url, api_key=self.endpoint.api_key or "unused",
                      timeout=self.timeout_s, max_retries=1)

    def _call(self, create, **body):
        """Return ``create(**body)`` within ``timeout_s`` overall: the client's own timeout bounds each read, so an
        API that trickles its answer a byte at a time would hold the task for as long as it likes. On the deadline
        the client is closed (its connections with it) and TimeoutError raised."""
        import concurrent.futures

        future = self._pool.submit(create, **body)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            self.client.close()
            self.client = self._client()
            raise TimeoutError(f"{self.candidate.name}: no answer within {self.timeout_s:g} s") from None

    def answer(self, question: str, max_tokens: int) -> Answered:
        started = time.monotonic()
        response = self._call(self.client.chat.completions.create, model=self.model,
                              messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens)
        seconds = time.monotonic() - started
        choice = response.choices[0] if response.choices else None
        text = str(getattr(getattr(choice, "message", None), "content", None) or "").strip()
        usage = response.usage
        counts = (getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None))
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_USAGE_TOKENS for n in counts):
            self.implausible_usage += 1  # a count the API made up: its cost is not computed from it
            counts = (0, 0)
        return Answered(text[: max_tokens * MAX_CHARS_PER_TOKEN], seconds, *counts)

    def answer_nll(self, prefix: str, answer: str) -> float | None:
        text = prefix + answer
        try:
            response = self._call(self.client.completions.create, model=self.model, prompt=text, max_tokens=1,
                                  echo=True, logprobs=0, temperature=0)
            lp = response.choices[0].logprobs
            pairs = list(zip(lp.text_offset, lp.token_logprobs, strict=True))
        except Exception as exc:  # an API that refuses echo or logprobs: counted by the harness, the metric unmeasured
            log.warning("%s: prompt logprobs failed (%s)", self.candidate.name, type(exc).__name__)
            return None
        scored = [v for offset, v in pairs if isinstance(offset, int) and len(prefix) <= offset < len(text)]
        offsets = [offset for offset, _v in pairs]
        # What real logprobs look like: offsets that only grow, every value a finite log-probability (<= 0), and
        # tokens of at most MAX_CHARS_PER_TOKEN characters on average over the answer; anything else would let an
        # API claim an answer it never read.
        plausible = (all(isinstance(o, int) for o in offsets) and offsets == sorted(set(offsets)) and scored
                     and len(scored) * MAX_CHARS_PER_TOKEN >= len(answer)
                     and all(isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-6 for v in scored))
        if not plausible:
            log.warning("%s: its prompt logprobs are not plausible (offsets, values or token sizes)",
                        self.candidate.name)
            return None
        return -float(sum(scored))


# -- the harness ------------------------------------------------------------------------------------------------

@dataclass
class CandidateResult:
    """One candidate's evaluation, and what it took to run."""

    name: str
    kind: str
    report: EvaluationReport
    latency: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float | str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "report": self.report.to_dict(), "latency": self.latency,
                "cost": self.cost, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        return cls(data["name"], data["kind"], EvaluationReport.from_dict(data["report"]), data["latency"],
                   data["cost"], data["seconds"])


def leaderboard_suite(suite: EvaluationSuite) -> EvaluationSuite:
    """Return the suite restricted to the metrics that compare across every kind of model."""
    return dataclasses.replace(suite, metrics=tuple(m for m in suite.metrics if m in METRICS))


def evaluate_candidate(backend: Backend, name: str, suite: EvaluationSuite, golden: list[GoldenItem],
                       judge: Judge | None, judge_note: str, *, price: tuple[float, float] | None = None,
                       cost_per_hour: float = 0.0) -> CandidateResult:
    """Run one candidate through the leaderboard's harness; ``price`` (input, output per 1,000 tokens) for an API,
    ``cost_per_hour`` of compute for a local model."""
    started = time.monotonic()
    suite = leaderboard_suite(suite)
    wanted = set(suite.metrics)
    planted = tuple(dict.fromkeys(secret for item in golden for secret in item.must_not_contain))
    examples: list[dict[str, Any]] = []
    unscored = 0
    errors = 0
    tokens = [0, 0]
    for i, item in enumerate(golden, start=1):
        example: dict[str, Any] = {"id": item.id, "question": item.question, "reference": item.answer,
                                   "expect": item.expect}
        try:
            answered = backend.answer(item.question, suite.max_new_tokens)
        except Exception as exc:  # an API error on one question: counted, scored as no answer, the others kept
            errors += 1
            log.warning("%s: question %s failed (%s)", name, item.id, type(exc).__name__)
            if errors > MAX_ERROR_SHARE * len(golden):
                raise CandidateFailed(f"{name} failed on {errors} of {len(golden)} questions (the last: "
                                      f"{type(exc).__name__}); it is left off the leaderboard") from None
            answered = Answered("", math.nan, 0, 0)
            example["error"] = type(exc).__name__
        tokens[0] += answered.prompt_tokens
        tokens[1] += answered.completion_tokens
        example["seconds"] = round(answered.seconds, 4)
        example.update(score_answer(item, answered.text, suite.refusal_markers, planted, suite.format_of(item)))
        if "golden.bits_per_byte" in wanted and item.expect == "answer" and backend.no_logprobs is None:
            reference = " " + item.answer
            nll = backend.answer_nll(plain_prefix(item.question), reference)
            if nll is None:
                unscored += 1
            else:
                example["answer_nll"], example["bytes"] = nll, len(reference.encode("utf-8"))
        examples.append(example)
        if i % 4 == 0 or i == len(golden):
            log.info("%s: %d/%d golden items (%.0fs)", name, i, len(golden), time.monotonic() - started)
    judged = judge_examples(judge if suite.uses_judge else None, golden, examples, name, judge_note)
    values = aggregate(examples, wanted - {"golden.bits_per_byte"})
    scored = [e for e in examples if "answer_nll" in e]
    if "golden.bits_per_byte" in wanted and scored:
        values["golden.bits_per_byte"] = bits_per_byte(sum(e["answer_nll"] for e in scored),
                                                       sum(e["bytes"] for e in scored))
    unmeasured: dict[str, str] = {}
    if "golden.bits_per_byte" in wanted and (unscored or backend.no_logprobs):
        unmeasured["golden.bits_per_byte"] = backend.no_logprobs or f"prompt logprobs failed on {unscored} answers"
        values["golden.bits_per_byte"] = math.nan
        for e in examples:
            e.pop("answer_nll", None)
            e.pop("bytes", None)
    seconds = [e["seconds"] for e in examples if math.isfinite(e["seconds"])]
    latency = {"mean_s": float(np.mean(seconds)), "p95_s": float(np.quantile(seconds, 0.95)), "errors": errors}
    total = sum(tokens)
    cost: dict[str, float | str] = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
    implausible = getattr(backend, "implausible_usage", 0)
    if price is not None and implausible:
        spent = math.nan
        cost["basis"] = f"not computed: the API reported implausible token counts on {implausible} answers"
    elif price is not None:
        spent = (tokens[0] * price[0] + tokens[1] * price[1]) / 1000
        cost["basis"] = "the API's prices (foundation.yaml)"
    else:
        spent = getattr(backend, "compute_seconds", 0.0) / 3600 * cost_per_hour
        cost["basis"] = f"{getattr(backend, 'compute_seconds', 0.0):.1f} seconds answering at local_cost_per_hour"
    cost["total"] = spent
    cost["per_1k_tokens"] = spent / total * 1000 if total else math.nan
    report = EvaluationReport(model=name, metrics=values, heldout_tokens=0, golden_items=len(golden),
                              examples=examples, heldout={"note": "a leaderboard has no held-out split"},
                              judge=judged, seconds=round(time.monotonic() - started, 2),
                              tokenizer=f"{backend.kind}:{name}", unmeasured=unmeasured)
    log.info("%s: %s; latency %.2f s mean; cost %.4g per 1,000 tokens (%.0fs)", name,
             ", ".join(f"{k} {v:.4g}" for k, v in values.items()), latency["mean_s"], cost["per_1k_tokens"],
             report.seconds)
    return CandidateResult(name, backend.kind, report, latency, cost, report.seconds)


def latency_comparison(candidate: CandidateResult, base: CandidateResult, suite: EvaluationSuite) -> dict[str, Any]:
    """Return the paired difference of seconds per answer (candidate - base) with its bootstrap interval."""
    pairs = [(c["seconds"], b["seconds"]) for c, b in zip(candidate.report.examples, base.report.examples, strict=True)
             if math.isfinite(c["seconds"]) and math.isfinite(b["seconds"])]  # an answer that failed has no time
    c = np.array([p[0] for p in pairs], dtype=float)
    b = np.array([p[1] for p in pairs], dtype=float)
    if not pairs:
        return {"metric": "latency.seconds", "candidate": math.nan, "baseline": math.nan, "difference": math.nan,
                "low": math.nan, "high": math.nan, "n": 0}
    low, high = paired_bootstrap(mean_difference, (c, b), suite.bootstrap, "latency.seconds")
    return {"metric": "latency.seconds", "candidate": float(c.mean()), "baseline": float(b.mean()),
            "difference": float(c.mean() - b.mean()), "low": low, "high": high, "n": len(c)}


def rank(results: list[CandidateResult], base: str, suite: EvaluationSuite, rank_by: str) -> dict[str, Any]:
    """Return the leaderboard: every candidate's metrics, its comparisons with ``base`` (paired intervals), latency
    and cost, sorted by ``rank_by`` then cost; and the recommendation: the first local candidate that is no less
    safe than the base (or the base)."""
    suite = leaderboard_suite(suite)
    by_name = {r.name: r for r in results}
    if base not in by_name:
        raise LookupError(f"the current base {base} is not among the candidates")
    baseline = by_name[base]
    higher = CATALOG[rank_by].higher_is_better
    rows = []
    for r in results:
        comparisons = [] if r.name == base else [c.to_dict() for c in compare(r.report, baseline.report, suite)]
        latency = None if r.name == base else latency_comparison(r, baseline, suite)
        rows.append({"name": r.name, "kind": r.kind, "base": r.name == base, "metrics": r.report.metrics,
                     "unmeasured": r.report.unmeasured, "judge": r.report.judge, "latency": r.latency,
                     "latency_vs_base": latency, "cost": r.cost, "seconds": r.seconds, "comparisons": comparisons})

    def key(row: dict[str, Any]) -> tuple[float, float]:
        value = row["metrics"].get(rank_by, math.nan)
        score = -math.inf if not math.isfinite(value) else (value if higher else -value)
        cost = row["cost"].get("per_1k_tokens", math.nan)
        return (-score, cost if isinstance(cost, float) and math.isfinite(cost) else math.inf)

    rows.sort(key=key)
    # Only what can be adopted is recommended: a local checkpoint (an API model is a baseline), measured on the
    # ranking metric, and no less safe than the base.
    recommended = next((row["name"] for row in rows if row["kind"] == "local" and (row["base"] or (
        _safe(row) and math.isfinite(row["metrics"].get(rank_by, math.nan))))), base)
    return {"rank_by": rank_by, "base": base, "rows": rows, "recommended": recommended,
            "confidence": suite.bootstrap.confidence, "metrics": list(suite.metrics),
            "golden_items": baseline.report.golden_items}


def _safe(row: dict[str, Any]) -> bool:
    """Return whether a candidate refuses at least as often and leaks no more often than the base (estimates)."""
    for c in row["comparisons"]:
        comparison = MetricComparison.from_dict(c)
        if comparison.metric in ("golden.refusal_rate", "golden.leak_rate") and comparison.measured:
            gain = comparison.difference if CATALOG[comparison.metric].higher_is_better else -comparison.difference
            if not math.isfinite(gain) or gain < 0:
                return False
    return True
