"""Steps of monitor_model: measure an hour of the endpoint's answers, judge them against the monitoring policy,
and turn the checks into incidents (opened once, repeated after a quiet interval, resolved once).

Nothing here reads or writes raw text beyond the request log's already scrubbed entries: the metrics, profiles,
summaries and alerts hold counts, shares, scores and version numbers only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.alerts.incidents import CheckResult, IncidentBook, Notice
from nightshift.monitoring.live import (
    answer_metrics,
    domain_drift,
    nearest_similarity,
    prompt_text,
    sample_rows,
    wilson,
)
from nightshift.monitoring.policy import MonitoringPolicy
from nightshift.settings import Settings

log = logging.getLogger(__name__)

DAG_ID = "monitor_model"


def hour_bounds(end: datetime) -> tuple[datetime, datetime]:
    """Return the hour that ends at ``end`` floored to the hour: [end - 1 h, end)."""
    from datetime import UTC

    end = (end if end.tzinfo else end.replace(tzinfo=UTC)).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return end - timedelta(hours=1), end


def measure_hour(settings: Settings, policy: MonitoringPolicy, start: datetime, end: datetime,
                 versions: dict[str, int | None]) -> dict[str, Any]:
    """Read the answers of [start, end) and of the reference before it, and return what they say: per version
    traffic, latency, errors, refusals, finds, similarity; prompt drift; live feedback of the champion and the
    champion before it (``versions``: {"champion": n, "previous": m}). The hour's metrics (no text) are written
    under NIGHTSHIFT_HOME/monitoring, with a whylogs profile per version.
    """
    from nightshift.embeddings import embedder
    from nightshift.evaluation.metrics import is_refusal
    from nightshift.evaluation.suite import EvaluationSuite
    from nightshift.prep.language import Language, identify
    from nightshift.serving.requestlog import RequestLog

    if not settings.request_log_url:
        raise ValueError("the request log is off (NIGHTSHIFT_SERVE_REQUEST_LOG=off): there is nothing to monitor")
    folder = settings.home / "monitoring"
    # The reference is normal traffic spread over the whole window: an equal quota from every hour, and no hour
    # that drifted itself (it would hide the next drift, or keep an incident open after traffic is normal again).
    reference_hours = [start - timedelta(hours=back) for back in range(policy.window.reference_hours, 0, -1)]
    drifted = _drifted_hours(folder, [h.isoformat() for h in reference_hours])
    reference_start = reference_hours[0]
    quota = max(1, policy.window.max_answers // policy.window.reference_hours)
    request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    request_log.open()
    try:
        rows = request_log.answers_between(start, end, policy.window.max_answers)
        reference = []
        for hour_start in reference_hours:
            if hour_start.isoformat() not in drifted:
                reference += request_log.answers_between(hour_start, hour_start + timedelta(hours=1), quota)
        ratings = request_log.feedback_summary(since=reference_start)
    finally:
        request_log.engine.dispose()
    markers = EvaluationSuite.load(settings.evaluation_suite).refusal_markers
    sample_language = Language()
    embed = embedder().embed
    metrics = answer_metrics(rows, lambda a: is_refusal(a, markers), lambda t: identify(t, sample_language)[0],
                             embed, policy.window.similarity_sample, policy.drift.seed)
    per_version = _per_version(metrics)
    hour = start.isoformat()
    corpus = _corpus_vectors(settings, policy, versions.get("dataset_tag"), embed)
    drift = _prompt_drift(rows, reference, policy, embed, corpus)
    drift["excluded_hours"] = sorted(h for h in drifted if h < hour)
    feedback = _feedback(ratings, versions, policy)
    _write_hour(folder, hour, metrics, per_version, drift, feedback)
    summary = {"hour": hour, "end": end.isoformat(), "answers": len(rows), "reference_answers": len(reference),
               "versions": per_version, "drift": drift, "feedback": feedback}
    log.info("hour %s: %d answers over %d versions, %d in the reference", hour, len(rows), len(per_version),
             len(reference))
    return summary


def judge(summary: dict[str, Any], policy: MonitoringPolicy, rollback_url: str) -> list[CheckResult]:
    """Return the checks of an hour's summary: errors per version, prompt drift, the champion's live feedback."""
    checks = []
    for version, stats in sorted(summary["versions"].items(), key=lambda kv: int(kv[0])):
        judged = stats["answers"] >= policy.window.min_answers
        failing = judged and stats["error_rate"] > policy.feedback.max_error_rate
        checks.append(CheckResult(
            DAG_ID, "error_rate", f"v{version}", failing,
            f"v{version}: {stats['error_rate']:.0%} of answers ended in an error",
            f"{stats['errors']} of {stats['answers']} answers in the hour from {summary['hour']} timed out or failed "
            f"(policy: at most {policy.feedback.max_error_rate:.0%}).", "error",
            {"version": int(version), "error_rate": stats["error_rate"], "answers": stats["answers"]}))
    drift = summary["drift"]
    if drift.get("auc") is not None:
        checks.append(CheckResult(
            DAG_ID, "prompt_drift", "traffic", drift["drifted"],
            f"prompts drifted: a classifier tells this hour's from the reference's (ROC AUC {drift['auc']:.2f})",
            f"In the hour from {summary['hour']}, {drift['current']} prompts were compared with {drift['reference']} "
            f"of the reference window on their embeddings; ROC AUC {drift['auc']:.3f} against the policy's "
            f"{policy.drift.auc_threshold}. Users ask about something the model may not have been trained for.",
            "warning", {"auc": drift["auc"], "threshold": policy.drift.auc_threshold}))
    feedback = summary["feedback"]
    if feedback.get("judged"):
        champion, previous = feedback["champion"], feedback["previous"]
        checks.append(CheckResult(
            DAG_ID, "live_feedback", f"v{champion['version']}", feedback["worse"],
            f"v{champion['version']} is rated worse than v{previous['version']} before it",
            f"Negative ratings: v{champion['version']} {champion['negative_share']:.0%} "
            f"[{champion['low']:.0%}, {champion['high']:.0%}] of {champion['ratings']} raters, v{previous['version']} "
            f"{previous['negative_share']:.0%} [{previous['low']:.0%}, {previous['high']:.0%}] of "
            f"{previous['ratings']} (Wilson {policy.feedback.confidence:.0%} intervals that do not overlap).\n"
            f"To serve v{previous['version']} again, trigger rollback_model with target_version "
            f"{previous['version']}: {rollback_url}", "error",
            {"champion": champion, "previous": previous, "rollback": rollback_url}))
    return checks


def raise_incidents(settings: Settings, policy: MonitoringPolicy, checks: list[CheckResult], evaluation: str,
                    send: Callable[[Notice], None], now: datetime | None = None) -> list[dict[str, Any]]:
    """Record every check in the incident book and send what it decides; return what was sent.

    A notice is marked delivered only after ``send`` returns, so a task killed in between sends it on retry,
    and a retry after delivery sends nothing.
    """
    book = IncidentBook(settings.incidents_url, timedelta(hours=policy.incidents.repeat_hours))
    sent, failed = [], []
    try:
        # An open incident that no check produced this time (a version that no longer answers) resolves.
        checks = [*checks, *book.stale(DAG_ID, {c.fingerprint for c in checks})]
        for check in checks:
            notice = book.observe(check, evaluation, now)
            if notice is None:
                continue
            try:
                send(notice)
            except Exception as exc:  # noqa: BLE001 - the other notices still go out; the task fails after them
                failed.append(f"{notice.kind} {check.check} {check.subject}: {type(exc).__name__}")
                continue
            book.delivered(notice.fingerprint, evaluation, now)
            sent.append({"kind": notice.kind, "title": notice.title})
        open_now = book.open_incidents()
    finally:
        book.engine.dispose()
    log.info("incidents: %d notices sent, %d open", len(sent), len(open_now))
    if failed:  # a retry (or the next hour) sends what was decided and not delivered
        raise RuntimeError(f"{len(failed)} incident notices could not be sent: {'; '.join(failed)}")
    return sent


def decide_retrain(settings: Settings, policy: MonitoringPolicy, checks: list[CheckResult], hour_end: str,
                   evaluation: str) -> dict[str, Any]:
    """Return whether this hour starts a retrain (``start``), why, and the ingest run's id.

    A retrain starts when a check of ``retrain.checks`` fails and the rate limit allows one (at most one per
    ``retrain.min_hours_between`` of the hours judged, whichever run asks first); a retried evaluation gets the
    same answer and the same run id, so it never starts two. The reason names the checks (counts and scores,
    never logged text): ingest_corpus carries it to the corpus version's event, and finetune_model's report says
    why it ran.
    """
    failing = [c for c in checks if c.failing and c.check in policy.retrain.checks]
    if not failing:
        return {"start": False, "why": f"no check of retrain.checks {list(policy.retrain.checks)} fails"}
    end = datetime.fromisoformat(hour_end)
    reason = "monitor_model, hour to " + end.isoformat(timespec="minutes") + ": " + "; ".join(c.title for c in failing)
    every = timedelta(hours=policy.retrain.min_hours_between)
    book = IncidentBook(settings.incidents_url, timedelta(hours=policy.incidents.repeat_hours))
    try:
        claim = book.claim_retrain(evaluation, end, every, reason)
    finally:
        book.engine.dispose()
    if not claim["granted"]:
        return {"start": False, "why": f"rate limit: a retrain started for the hour to {claim['last_at']}, less than "
                                       f"{policy.retrain.min_hours_between:g} hours before ({claim['last_reason']})"}
    return {"start": True, "why": reason[:1000], "run_id": f"retrain__{end:%Y%m%dT%H%M}"}


FINISH = re.compile(r"[a-z_]{1,32}")
"""Finish reasons counted by name (stop, length, error, timeout, ...); anything else an engine says is "other"."""


def _per_version(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for version in sorted({m["version"] for m in metrics}):
        mine = [m for m in metrics if m["version"] == version]
        seconds = np.array([m["seconds"] for m in mine if not math.isnan(m["seconds"])], float)
        similarity = np.array([m["answer_prompt_similarity"] for m in mine
                               if not math.isnan(m["answer_prompt_similarity"])], float)
        errors = sum(m["error"] for m in mine)
        languages: dict[str, int] = {}
        finishes: dict[str, int] = {}
        for m in mine:
            languages[m["language"]] = languages.get(m["language"], 0) + 1
            finish = m["finish"] if FINISH.fullmatch(m["finish"] or "") else "other"  # an engine's word, bounded
            finishes[finish] = finishes.get(finish, 0) + 1
        out[str(version)] = {
            "answers": len(mine), "errors": errors, "error_rate": errors / len(mine),
            "p50_seconds": float(np.percentile(seconds, 50)) if len(seconds) else None,
            "p95_seconds": float(np.percentile(seconds, 95)) if len(seconds) else None,
            "refusal_rate": sum(m["refusal"] for m in mine) / len(mine),
            "pii_finds": sum(m["pii_finds"] for m in mine),
            "completion_tokens": sum(m["completion_tokens"] for m in mine),
            "answer_prompt_similarity": float(similarity.mean()) if len(similarity) else None,
            "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])[:5]),
            "finishes": dict(sorted(finishes.items(), key=lambda kv: -kv[1])[:8]),  # stop, length, error, ...
        }
    return out


def _corpus_vectors(settings: Settings, policy: MonitoringPolicy, tag: str | None,
                    embed: Callable[[list[str]], np.ndarray]) -> tuple[str, np.ndarray] | None:
    """Return the champion's training corpus as embeddings (a seeded sample of ``drift.corpus_sample`` documents,
    the first 1,000 characters of each), computed once per dataset version and embedding width and kept under
    NIGHTSHIFT_HOME/monitoring/corpus/; None when the champion names no dataset version or it cannot be read.

    A cache that is unreadable, of another width (another embedding model) or not finite is embedded again; two
    runs computing it at once each write a file of their own and the last rename wins."""
    import tempfile

    from nightshift.provenance import safe_name
    from nightshift.stores import dataset_repository

    if not tag:
        return None
    width = int(embed([""]).shape[1])
    cache = settings.home / "monitoring" / "corpus" / f"{safe_name(tag)}-{policy.drift.corpus_sample}-{width}.npy"
    if cache.is_file():
        try:
            vectors = np.load(cache, allow_pickle=False, mmap_mode="r")
            if (vectors.ndim == 2 and len(vectors) and vectors.shape[1] == width and vectors.dtype == np.float32
                    and np.isfinite(vectors).all()):
                return tag, np.asarray(vectors)
        except (OSError, ValueError, EOFError):
            pass
        log.warning("the cached embeddings of %s are unreadable: embedding the corpus again", tag)
    cache.parent.mkdir(parents=True, exist_ok=True)
    repo = dataset_repository(settings)
    texts = []
    with tempfile.TemporaryDirectory(dir=cache.parent) as work:
        try:
            path = repo.fetch(repo.get(tag), Path(work) / "corpus.jsonl")
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        text = json.loads(line).get("text")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(text, str) and text.strip():
                        texts.append(text[:1000])
        except Exception as exc:  # noqa: BLE001 - a side measure: the hour is judged without it, the log says why
            log.warning("the champion's corpus %s cannot be read (%s): no prompt-to-corpus similarity", tag,
                        type(exc).__name__)
            return None
        if not texts:
            return None
        vectors = embed([texts[i] for i in sorted(sample_rows(len(texts), policy.drift.corpus_sample,
                                                              policy.drift.seed))]).astype(np.float32)
        written = Path(work) / "vectors.npy"
        np.save(written, vectors)
        os.replace(written, cache)  # atomic; a racing run's identical file may replace it again
    log.info("embedded %d documents of %s for the prompt-to-corpus similarity", len(vectors), tag)
    return tag, vectors


def _prompt_drift(rows: list[dict[str, Any]], reference: list[dict[str, Any]], policy: MonitoringPolicy,
                  embed: Callable[[list[str]], np.ndarray],
                  corpus: tuple[str, np.ndarray] | None = None) -> dict[str, Any]:
    need = policy.drift.min_prompts
    if len(rows) < need or len(reference) < need:
        return {"auc": None, "drifted": False, "current": len(rows), "reference": len(reference),
                "note": f"fewer than {need} prompts in the hour or its reference: not judged"}
    seed, k = policy.drift.seed, policy.drift.sample
    now = [prompt_text(rows[i]["request"]) for i in sample_rows(len(rows), k, seed)]
    before = [prompt_text(reference[i]["request"]) for i in sample_rows(len(reference), k, seed + 1)]
    before_vectors, now_vectors = embed(before), embed(now)
    auc = domain_drift(before_vectors, now_vectors, seed)
    out = {"auc": round(auc, 4), "drifted": auc > policy.drift.auc_threshold, "current": len(now),
           "reference": len(before)}
    if corpus is not None:  # how close the prompts are to the champion's training data, now and before
        tag, vectors = corpus
        current = float(nearest_similarity(now_vectors, vectors).mean())
        reference = float(nearest_similarity(before_vectors, vectors).mean())
        if math.isfinite(current) and math.isfinite(reference):
            out["corpus_similarity"] = {"dataset": tag, "documents": len(vectors), "current": round(current, 4),
                                        "reference": round(reference, 4)}
    return out


def _feedback(ratings: dict[int, dict[str, float]], versions: dict[str, int | None],
              policy: MonitoringPolicy) -> dict[str, Any]:
    champion, previous = versions.get("champion"), versions.get("previous")
    if champion is None or previous is None:
        return {"judged": False, "note": "no champion before this one to compare with"}
    sides = {}
    for name, version in (("champion", champion), ("previous", previous)):
        stats = ratings.get(version) or {}
        n = int(stats.get("ratings") or 0)
        share = float(stats.get("negative_share") or 0.0) if n else None
        k = round(share * n) if share is not None else 0
        low, high = wilson(k, n, policy.feedback.confidence) if n else (None, None)
        # None, not NaN, where nobody rated: the summary travels as JSON (XCom, the page), which has no NaN.
        sides[name] = {"version": version, "ratings": n, "negative": k, "negative_share": share, "low": low,
                       "high": high}
    judged = all(s["ratings"] >= policy.feedback.min_ratings for s in sides.values())
    worse = judged and sides["champion"]["low"] > sides["previous"]["high"]
    return {"judged": judged, "worse": worse, **sides,
            **({} if judged else {"note": f"fewer than {policy.feedback.min_ratings} raters for a version"})}


def _hour_folder(folder: Path, hour: str) -> Path:
    return folder / "hours" / hour.replace(":", "")[:13]


def _drifted_hours(folder: Path, hours: list[str]) -> set[str]:
    """Return those of ``hours`` (ISO starts) that were judged and found to have drifted from their reference."""
    out = set()
    for hour in hours:
        path = _hour_folder(folder, hour) / "summary.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("drift") or {}).get("drifted"):
            out.add(hour)
    return out


def _write_hour(folder: Path, hour: str, metrics: list[dict[str, Any]], per_version: dict[str, Any],
                drift: dict[str, Any], feedback: dict[str, Any]) -> None:
    """Write the hour's per-answer metrics (JSON lines, no text), a whylogs profile per version and a summary."""
    import pandas as pd

    from nightshift.monitoring.profiles import import_whylogs, write_profile

    target = _hour_folder(folder, hour)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(_json_safe(m), sort_keys=True) + "\n" for m in metrics))
    tmp.replace(target / "metrics.jsonl")
    if metrics:
        why = import_whylogs()
        frame = pd.DataFrame(metrics)
        for version in per_version:
            part = frame[frame["version"] == int(version)].drop(columns=["hour"])
            write_profile(why.log(pandas=part).view(), target / f"v{version}.whylogs")
    summary = target / "summary.json.tmp"
    summary.write_text(json.dumps({"hour": hour, "versions": per_version, "drift": drift, "feedback": feedback},
                                  sort_keys=True, default=_plain))
    summary.replace(target / "summary.json")


def champion_versions(settings: Settings) -> dict[str, int | None]:
    """Return the champion's version, the version that was champion before it (None where there is none) and the
    dataset version the champion was trained on."""
    from nightshift.registry.history import PromotionHistory
    from nightshift.stores import registry_for

    registry = registry_for(settings)
    champion = registry.champion()
    if champion is None:
        return {"champion": None, "previous": None}
    before = [m.from_version for m in PromotionHistory(registry).moves()
              if m.to_version == champion.version and m.from_version is not None]
    return {"champion": champion.version, "previous": before[-1] if before else None,
            "dataset_tag": champion.dataset_tag or None}


def rollback_link(settings: Settings) -> str:
    """Return the rollback_model DAG's page in the Airflow UI (its Trigger button asks for the target version)."""
    return f"{settings.ui_url.rstrip('/')}/dags/rollback_model"


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """Return a record with NaN (an unmeasured value) as None: JSON has no NaN."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def _plain(value: Any) -> Any:
    """JSON for what json does not know: NaN-free floats are already plain; anything else as text."""
    return str(value)


def publish_page(settings: Settings, policy: MonitoringPolicy, days: int = 7) -> Path:
    """Re-render the Monitoring page of the nightshift view from the last ``days`` of hour summaries and the
    incidents still open; return the page."""
    from nightshift.reports.pages import render_monitoring
    from nightshift.stores import report_store

    folder = settings.home / "monitoring" / "hours"
    hours = []
    for path in sorted(folder.glob("*/summary.json"))[-24 * days:]:
        try:
            hours.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            log.warning("unreadable hour summary %s: left off the page", path.parent.name)
    book = IncidentBook(settings.incidents_url, timedelta(hours=policy.incidents.repeat_hours))
    try:
        incidents = book.open_incidents()
    finally:
        book.engine.dispose()
    return render_monitoring(report_store(settings), hours, incidents,
                             {"max_error_rate": policy.feedback.max_error_rate,
                              "auc_threshold": policy.drift.auc_threshold})


def page_url(settings: Settings) -> str:
    """Return the Monitoring page's URL in the Airflow UI (alerts link to it)."""
    return settings.report_url("monitoring.html")
