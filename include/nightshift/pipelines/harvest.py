"""Steps of harvest_feedback: rated answers become candidate training documents, a person approves or rejects
each batch in the Airflow UI, and approved batches are what the ``feedback`` source reads on the next night.

A candidate is a question and an answer: the rater's correction when there is one, else the answer as given
when its rating reaches the policy's ``min_rating``. Everything is the request log's scrubbed text. Batches
live under ``$NIGHTSHIFT_HOME/feedback/``: ``pending/`` while a person decides, then ``approved/`` or
``rejected/`` with who decided and when. An answer is offered once, whatever became of its batch.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nightshift.monitoring.live import prompt_text
from nightshift.monitoring.policy import Harvest
from nightshift.pipelines.approval import code_span
from nightshift.provenance import safe_name
from nightshift.settings import Settings

log = logging.getLogger(__name__)

STATES = ("pending", "approved", "rejected")
EXAMPLES = 5
EXAMPLE_CHARS = 300


def feedback_dir(settings: Settings) -> Path:
    """Return the folder of feedback batches (pending/, approved/, rejected/)."""
    return settings.home / "feedback"


def offered_ids(folder: Path) -> set[str]:
    """Return the answers offered in any batch so far, whatever was decided."""
    ids = set()
    for state in STATES:
        for path in (folder / state).glob("*.jsonl"):
            for row in _read(path):
                ids.add(row["response_id"])
    return ids


def collect_candidates(settings: Settings, policy: Harvest, batch: str, now: datetime | None = None) -> dict[str, Any]:
    """Write the next batch of candidates to ``pending/<batch>.jsonl`` and return its summary (counts and a few
    scrubbed, shortened examples for the person who decides). A retry of the same batch returns the same batch.
    """
    folder = feedback_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):  # two runs at once would offer the same answers twice
        return _collect(settings, policy, safe_name(batch), folder, now)


def _collect(settings: Settings, policy: Harvest, batch: str, folder: Path, now: datetime | None) -> dict[str, Any]:
    from nightshift.serving.requestlog import RequestLog

    for state in ("approved", "rejected", "pending"):  # a decided batch is decided, whatever copy is left
        existing = folder / state / f"{batch}.jsonl"
        if existing.is_file():
            return summarize(batch, state, _read(existing))
    if not settings.request_log_url:
        raise ValueError("the request log is off (NIGHTSHIFT_SERVE_REQUEST_LOG=off): there is no feedback to harvest")
    now = now or datetime.now(UTC)
    request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    request_log.open()
    try:
        rated = request_log.feedback_since(now - timedelta(days=policy.lookback_days), limit=1_000_000)
    finally:
        request_log.engine.dispose()
    seen = offered_ids(folder)
    candidates = []
    for row in rated:
        if row["response_id"] in seen:
            continue
        question = prompt_text(row["request"]).strip()
        correction = (row["correction"] or "").strip()
        given = " ".join(str(a) for a in row["answer"] or []).strip()
        if policy.corrections and correction:
            kind, answer = "correction", correction
        elif policy.min_rating is not None and row["rating"] >= policy.min_rating and given:
            kind, answer = "rated", given
        else:
            continue
        if not question:
            continue
        candidates.append({"response_id": row["response_id"], "kind": kind, "rating": row["rating"],
                           "model_version": row["model_version"], "rated_at": row["created_at"].isoformat(),
                           "question": question, "answer": answer})
        if len(candidates) >= policy.max_batch:
            break
    target = folder / "pending" / f"{batch}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(json.dumps(c, ensure_ascii=False, sort_keys=True) + "\n" for c in candidates),
                   encoding="utf-8")
    tmp.replace(target)
    log.info("feedback batch %s: %d candidates (%d corrections)", batch, len(candidates),
             sum(c["kind"] == "correction" for c in candidates))
    return summarize(batch, "pending", candidates)


def summarize(batch: str, state: str, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Return what a person needs to decide on a batch: counts, versions, and a few shortened examples."""
    versions: dict[str, int] = {}
    for c in candidates:
        versions[f"v{c['model_version']}"] = versions.get(f"v{c['model_version']}", 0) + 1
    return {"batch": batch, "state": state, "candidates": len(candidates),
            "corrections": sum(c["kind"] == "correction" for c in candidates),
            "rated": sum(c["kind"] == "rated" for c in candidates), "versions": versions,
            "examples": [{"kind": c["kind"], "question": _short(c["question"]), "answer": _short(c["answer"])}
                         for c in candidates[:EXAMPLES]]}


def _short(text: str) -> str:
    return " ".join(text.split())[:EXAMPLE_CHARS]


def approval_body(summary: dict[str, Any]) -> str:
    """Return the Markdown a person reads in the approval form."""
    lines = [f"**{summary['candidates']} candidate training documents** in batch `{summary['batch']}`: "
             f"{summary['corrections']} corrections written by raters, {summary['rated']} answers rated well.",
             "", "Answers by model version: " + (", ".join(f"{v}: {n}" for v, n in summary["versions"].items())
                                                 or "none"),
             "", "Approved documents join the next night's corpus through the `feedback` source and go through "
             "the whole preparation recipe. The text below was scrubbed when it was logged.", ""]
    for i, example in enumerate(summary["examples"], 1):
        lines += [f"{i}. *{example['kind']}*", f"   - question: {code_span(example['question'])}",
                  f"   - answer: {code_span(example['answer'])}"]
    return "\n".join(lines)


def decide(settings: Settings, batch: str, approved: bool, by: str, at: str) -> dict[str, Any]:
    """Move a pending batch to approved/ or rejected/, recording who decided and when; return the summary.

    Deciding a batch twice (a retried task) changes nothing: the first decision stands.
    """
    folder = feedback_dir(settings)
    batch = safe_name(batch)
    pending = folder / "pending" / f"{batch}.jsonl"
    for state in ("approved", "rejected"):
        done = folder / state / f"{batch}.jsonl"
        if done.is_file():
            pending.unlink(missing_ok=True)  # left behind when a decision was cut short
            return {**summarize(batch, state, _read(done)), **_decision(done)}
    if not pending.is_file():
        raise LookupError(f"no pending feedback batch {batch!r}")
    state = "approved" if approved else "rejected"
    target = folder / state / pending.name
    target.parent.mkdir(parents=True, exist_ok=True)
    decision = {"batch": batch, "decision": state, "by": by, "at": at}
    note = target.with_suffix(".decision.json")
    note.write_text(json.dumps(decision, sort_keys=True))
    rows = _read(pending)
    stamped = [{**row, "approved_by" if approved else "rejected_by": by, "decided_at": at} for row in rows]
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in stamped),
                   encoding="utf-8")
    tmp.replace(target)  # the batch is decided from here on; the pending copy goes next
    pending.unlink(missing_ok=True)
    log.info("feedback batch %s %s by %s (%d documents)", batch, state, by, len(rows))
    return {**summarize(batch, state, stamped), **decision}


class _locked:
    """An exclusive lock on the feedback folder (fcntl), held while a batch is chosen and written."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"

    def __enter__(self) -> None:
        import fcntl

        self.handle = self.path.open("a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *_exc) -> None:
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _decision(path: Path) -> dict[str, Any]:
    note = path.with_suffix(".decision.json")
    return json.loads(note.read_text()) if note.is_file() else {}


def _read(path: Path) -> list[dict[str, Any]]:
    """Return a batch's rows; a line that is not a candidate (edited by hand, cut short) is left out and logged."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("response_id"), str):
                    rows.append(row)
                    continue
            except ValueError:
                pass
            log.warning("feedback batch %s line %d is not a candidate: left out", path.name, number)
    return rows


