"""Steps of a rollout: expose the candidate, move its share step by step, judge each step on live signals,
then promote it or roll it back. Every step can be retried: shares are set, not added; the promotion is a
keyed move of the promotion history; ending a rollout twice changes nothing more.

The promotion is a compare-and-set: it happens only while the champion is still the version the candidate
was compared with; otherwise the rollout ends (state ``conflict``) and the history stays as it was.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from nightshift.evaluation.rollout_policy import RolloutPolicy, judge_step
from nightshift.pipelines.finetune import GATE_TAG
from nightshift.records import ModelVersionRecord
from nightshift.registry.history import ChampionConflict
from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.registry.rollout_state import STATE_TAG, Rollouts
from nightshift.settings import Settings

log = logging.getLogger(__name__)


class RolloutRefused(ValueError):
    """The rollout cannot start as asked; the message says what to change."""


def release_route(registry: ModelRegistry, policy: RolloutPolicy) -> tuple[str, str]:
    """Return how a version that passed the gate goes out, ``promote`` or ``rollout``, and why."""
    if policy.mode == "off":
        return "promote", "rollout policy: off, the champion alias moves at once"
    if registry.champion() is None:
        # A rollout compares the candidate with the champion on live traffic: with none, it could never end.
        return "promote", (f"rollout policy: {policy.mode}, but there is no champion to compare the candidate with "
                           "on live traffic: promoting it directly")
    return "rollout", f"rollout policy: {policy.mode}"


def start_rollout(registry: ModelRegistry, version: ModelVersionRecord, policy: RolloutPolicy,
                  mode: str | None = None) -> dict[str, Any]:
    """Expose a gated version as the candidate at the first step's share (or in shadow)."""
    mode = mode or policy.mode
    if mode not in ("canary", "shadow"):
        raise RolloutRefused(f"rollout mode must be canary or shadow, not {mode!r} (rollout.yaml: mode)")
    rollout = Rollouts(registry).start(version, mode, policy.steps[0] if mode == "canary" else 0.0)
    return rollout.to_dict()


def plan_rollout(registry: ModelRegistry, requested: int | None, mode: str | None,
                 policy: RolloutPolicy) -> dict[str, Any]:
    """Return the rollout to run: the requested version, else the one the candidate alias names."""
    champion = registry.champion()
    rollouts = Rollouts(registry)
    current = rollouts.current()
    if champion is None:
        # Refused for good: a candidate left exposed would keep its share of traffic and be refused every night.
        ended = ""
        if current is not None:
            rollouts.end(current.version, "refused")
            ended = f"; the candidate alias on {current.version.label} was removed"
        raise RolloutRefused("there is no champion to compare a candidate with on live traffic: promote a first "
                             "version directly (finetune_model does so when there is no champion, whatever "
                             f"rollout.yaml says){ended}")
    if requested is None:
        if current is None:
            raise RolloutRefused("no version carries the candidate alias; give candidate_version")
        version = current.version
    else:
        try:
            version = registry.get(requested)
        except Exception:
            raise RolloutRefused(f"version {requested} of {registry.model_name} does not exist") from None
    if version.version == champion.version:
        raise RolloutRefused(f"{version.label} is the champion already")
    if registry.version_tags(version.version).get(GATE_TAG) != "passed":
        raise RolloutRefused(f"{version.label} never passed the evaluation gate: it cannot take live traffic")
    mode = mode or (current.mode if current and current.version.version == version.version else None) \
        or (policy.mode if policy.mode != "off" else "canary")
    if current is None or current.version.version != version.version or current.mode != mode:
        start_rollout(registry, version, policy, mode)
    return {"candidate": version.to_dict(), "champion": champion.to_dict(), "mode": mode,
            "steps": list(policy.steps), "message": f"rolling out {version.label} ({mode}) against {champion.label}"}


def set_step(registry: ModelRegistry, plan: dict[str, Any], index: int, policy: RolloutPolicy) -> dict[str, Any]:
    """Give the candidate this step's share (none in shadow mode); return when the step started."""
    version = ModelVersionRecord.from_dict(plan["candidate"])
    share = policy.steps[index] if plan["mode"] == "canary" else 0.0
    rollouts = Rollouts(registry)
    current = rollouts.current()
    if current is None or current.version.version != version.version:
        raise RolloutRefused(f"{version.label} is no longer the candidate (the alias moved): the rollout stops")
    rollouts.set_share(version, share)
    started = time.time()
    log.info("step %d of %d: %s gets %s", index + 1, len(policy.steps), version.label,
             f"{share:.0%} of traffic" if plan["mode"] == "canary" else "every request in shadow")
    return {"step": index + 1, "share": share, "started": started}


def observe_step(request_log, plan: dict[str, Any], step: dict[str, Any], policy: RolloutPolicy,
                 now: float | None = None, judge=None, judge_note: str = "") -> dict[str, Any]:
    """Judge the step so far from the request log (and, with a ``judge``, the LLM judge's scores of a sample of
    each version's answers); ``ready`` False means: look again later."""
    candidate = plan["candidate"]["version"]
    champion = plan["champion"]["version"]
    prompt = plan.get("prompt")  # a prompt's rollout: its versions compared over the champion model's answers
    since = datetime.fromtimestamp(step["started"], UTC)
    stats = request_log.window_stats(since, [candidate, champion], prompt)
    elapsed = ((now or time.time()) - step["started"]) / 60
    verdict = judge_step(stats[candidate], stats[champion], elapsed, policy)
    if verdict.ready and judge is not None and policy.judge_sample > 0:
        for version in (candidate, champion):
            sample = request_log.sample_answers(since, version, policy.judge_sample, prompt)
            scores = [s for s in (judge.score_live(q, a) for _id, q, a in sample) if s is not None]
            stats[version]["judged"] = float(len(scores))
            stats[version]["judge_correctness"] = (sum(s.correctness for s in scores) / len(scores)
                                                   if scores else float("nan"))
        verdict = judge_step(stats[candidate], stats[champion], elapsed, policy)
    elif judge is None:
        stats[candidate]["judge_note"] = judge_note or "no judge configured"
        verdict = judge_step(stats[candidate], stats[champion], elapsed, policy)
    return verdict.to_dict()


def live_judge(settings: Settings, resolve_endpoint):
    """Return (Judge, "") when the evaluation suite's judge endpoint resolves, else (None, why).

    ``resolve_endpoint(connection, model)`` returns ``(JudgeEndpoint, "")`` or ``(None, why)``: in a DAG, the
    Airflow adapter's ``airflow.connections.judge_endpoint`` (pipelines know nothing of Airflow).
    """
    from nightshift.evaluation.judge import Judge
    from nightshift.evaluation.suite import EvaluationSuite

    suite = EvaluationSuite.load(settings.evaluation_suite)
    endpoint, note = resolve_endpoint(suite.judge.connection, suite.judge.model)
    if endpoint is None:
        return None, note
    return Judge(endpoint, suite.judge, settings.cache_dir / "judge"), ""


def finish_rollout(registry: ModelRegistry, plan: dict[str, Any], verdicts: list[dict[str, Any] | None],
                   key: str, by: str, dag_run: str) -> dict[str, Any]:
    """Promote the candidate when every step passed; otherwise send all traffic back to the champion.

    The promotion happens only while the champion is still the version the candidate was compared with: when
    it is not, the rollout ends (state ``conflict``, all traffic to the champion) and ChampionConflict is raised.
    """
    version = ModelVersionRecord.from_dict(plan["candidate"])
    rollouts = Rollouts(registry)
    passed = len(verdicts) == len(plan["steps"]) and all(v and v.get("passed") for v in verdicts)
    state = registry.version_tags(version.version).get(STATE_TAG)
    if passed:
        reasons = [r for v in verdicts for r in v["reasons"]]  # type: ignore[index]
        try:
            registry.promote(version, key=key, kind="rollout", by=by, dag_run=dag_run,
                             reason=f"{plan['mode']} rollout passed {len(verdicts)} steps",
                             evaluation={"steps": verdicts}, expected=plan["champion"]["version"])
        except ChampionConflict:
            rollouts.end(version, "conflict")
            raise
        rollouts.end(version, "promoted")
        outcome = "promoted"
    else:
        reasons = [r for v in verdicts if v for r in v.get("reasons", [])] or ["a step failed or timed out"]
        current = rollouts.current()
        if state == "promoted":
            outcome = "promoted"  # a retry after the promotion
        else:
            if current is not None and current.version.version == version.version:
                rollouts.end(version, "rolled_back")
            else:
                registry.set_version_tags(version.version, {STATE_TAG: "rolled_back"})
            outcome = "rolled_back"
    log.info("rollout of %s: %s", version.label, outcome)
    return {"outcome": outcome, "candidate": version.version, "champion": plan["champion"]["version"],
            "reasons": reasons}


# -- a prompt's rollout: the same steps, routing and live signals, on the prompt's candidate alias ------------------

def plan_prompt_rollout(prompts, name: str, requested: int | None, mode: str | None,
                        policy: RolloutPolicy) -> dict[str, Any]:
    """Return the rollout of a prompt version against the production prompt: the requested version, else the one
    its ``candidate`` alias names (evaluate_prompt sets it with ``mode: canary``). Canary only: a prompt changes
    what users read, so a share of users is the signal."""
    from nightshift.registry.prompt_registry import CANDIDATE, PRODUCTION

    if mode not in (None, "canary"):
        raise RolloutRefused("a prompt is rolled out as a canary only (mode: canary or policy)")
    production = prompts.by_alias(name, PRODUCTION)
    current = prompts.rollout(name)
    if production is None:
        raise RolloutRefused(f"prompt {name} has no production version to compare a candidate with: release a "
                             "first version directly (evaluate_prompt with mode promote)")
    if requested is None:
        if current is None:
            raise RolloutRefused(f"no version of prompt {name} carries the {CANDIDATE} alias; give candidate_version")
        version = current[0]
    else:
        try:
            version = prompts.get(name, requested)
        except LookupError:
            raise RolloutRefused(f"prompt {name} has no version {requested}") from None
    if version.version == production.version:
        raise RolloutRefused(f"{version.label} is the production prompt already")
    # Only a gate passed against the production prompt of now, and not undone since, lets a version take traffic.
    records = [m for m in prompts.history(name) if m.to_version == version.version and m.state == "done"]
    last = records[-1] if records else None
    if last is None or last.kind != "canary":
        raise RolloutRefused(f"{version.label} has no standing pass of evaluate_prompt's gate (it never passed, or "
                             "was declined or rolled back since): evaluate it again with mode canary")
    if last.from_version != production.version:
        raise RolloutRefused(f"{version.label} passed the gate against v{last.from_version}, not against the "
                             f"production prompt of now ({production.label}): evaluate it again with mode canary")
    if current is None or current[0].version != version.version:
        prompts.start_rollout(version, policy.steps[0])
    return {"prompt": name, "candidate": {"version": version.version, "label": version.label},
            "champion": {"version": production.version, "label": production.label}, "mode": "canary",
            "steps": list(policy.steps),
            "message": f"rolling out prompt {version.label} (canary) against {production.label}"}


def set_prompt_step(prompts, plan: dict[str, Any], index: int, policy: RolloutPolicy) -> dict[str, Any]:
    """Give the candidate prompt this step's share; return when the step started."""
    current = prompts.rollout(plan["prompt"])
    if current is None or current[0].version != plan["candidate"]["version"]:
        raise RolloutRefused(f"{plan['candidate']['label']} is no longer the candidate prompt (the alias moved): the "
                             "rollout stops")
    share = policy.steps[index]
    prompts.set_share(current[0], share)
    log.info("step %d of %d: %s gets %.0f%% of traffic", index + 1, len(policy.steps), current[0].label, share * 100)
    return {"step": index + 1, "share": share, "started": time.time()}


def finish_prompt_rollout(prompts, plan: dict[str, Any], verdicts: list[dict[str, Any] | None], key: str, by: str,
                          dag_run: str) -> dict[str, Any]:
    """Move ``production`` to the candidate prompt when every step passed (only while production is still the
    version it was compared with: PromptConflict otherwise); else send all traffic back to production and record
    the candidate as declined. The candidate alias is removed either way."""
    version = prompts.get(plan["prompt"], plan["candidate"]["version"])
    passed = len(verdicts) == len(plan["steps"]) and all(v and v.get("passed") for v in verdicts)
    reasons = [r for v in verdicts if v for r in v.get("reasons", [])] or ["a step failed or timed out"]
    evidence = {"steps": [v for v in verdicts if v]}
    if passed:
        try:
            prompts.move(version, key=key, expected=plan["champion"]["version"], kind="rollout", by=by,
                         dag_run=dag_run, reason=f"canary passed {len(verdicts)} steps", evaluation=evidence)
        finally:
            prompts.end_rollout(version)
        outcome = "promoted"
    else:
        prompts.end_rollout(version)
        prompts.decline(version, key=f"{key}/declined", by=by, dag_run=dag_run,
                        reason="rolled back after its canary", evaluation=evidence)
        outcome = "rolled_back"
    log.info("rollout of prompt %s: %s", version.label, outcome)
    return {"outcome": outcome, "prompt": plan["prompt"], "candidate": version.version,
            "champion": plan["champion"]["version"], "reasons": reasons}


def request_log_for(settings: Settings):
    """Open the endpoint's request log (the live signals) for reading."""
    from nightshift.serving.requestlog import RequestLog

    if not settings.request_log_url:
        raise RolloutRefused("the request log is off (NIGHTSHIFT_SERVE_REQUEST_LOG=off): a rollout has no signals")
    request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    request_log.open()
    return request_log


def outcome_alert(plan: dict[str, Any], outcome: dict[str, Any], dag_id: str, run_id: str, task_id: str):
    """Return the alert that tells people how a rollout ended: promoted (info) or rolled back (warning)."""
    from nightshift.alerts.channels import Alert

    promoted = outcome["outcome"] == "promoted"
    what = f"prompt {outcome['prompt']} " if outcome.get("prompt") else ""
    return Alert(
        title=f"{what or 'candidate '}v{outcome['candidate']} {'promoted' if promoted else 'rolled back'} after its "
              "rollout",
        message=(f"v{outcome['candidate']} passed every {plan['mode']} step and is now "
                 f"{'the production prompt' if what else 'champion'}." if promoted else
                 f"v{outcome['candidate']} did not pass its {plan['mode']} rollout; all traffic is back on "
                 f"v{outcome['champion']}."),
        severity="info" if promoted else "warning", dag_id=dag_id, run_id=run_id, task_id=task_id,
        details=outcome,
    )
