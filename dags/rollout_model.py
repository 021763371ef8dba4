"""
# rollout_model

Expose a candidate model to live traffic step by step, and promote or roll it back on its own.

`finetune_model` starts it when a candidate passes the gate and `include/configs/rollout.yaml` says
`mode: canary` or `mode: shadow`; you can also start it from **Trigger** for any version that passed the gate.

**Params**

- `candidate_version`: the version to roll out; empty: the version the registry's `candidate` alias names.
- `prompt`: roll out a version of this prompt template instead of a model: `evaluate_prompt` (mode canary)
  points the prompt's `candidate` alias at a version that passed its gate; the same steps, sticky routing and
  live signals (the champion's answers under each prompt version) decide, and success moves the prompt's
  `production` alias (`nightshift prompts history`). Canary only.
- `mode`: `canary` (a growing share of users gets the candidate) or `shadow` (the candidate answers in the
  background only, into the request log); `policy`: what rollout.yaml says (canary when it says off).

**Tasks**

- `plan_rollout`: the candidate exists, is not the champion and passed the gate; the `candidate` alias
  points at it. With no champion at all it refuses and removes the `candidate` alias (nothing to compare with).
- `step_N_share`: the candidate gets step N's share of traffic (sticky per user or API key).
- `step_N_observe`: waits until the step has lasted `step_minutes` and each version answered `min_answers`
  requests, then compares error rate, p95 latency and negative feedback from the request log, and (with the
  judge connection `nightshift_judge`) the LLM judge's scores of a sample of each version's answers; the step
  fails when the candidate is worse than the policy allows.
- `finish_rollout`: every step passed: the candidate becomes champion (kept in the promotion history), but
  only if the champion is still the version it was compared with; otherwise (say, a rollback in between) the
  alias is removed and all traffic returns to the champion. Alerts either way.

Every answer says which version produced it (`X-Nightshift-Model-Version`, `system_fingerprint`).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from nightshift.airflow.common import CANDIDATE_ASSET, CHAMPION_ASSET, DEFAULT_ARGS, current_run, fail_fast
from nightshift.evaluation.rollout_policy import RolloutPolicy
from nightshift.settings import load_settings

SETTINGS = load_settings()
try:
    POLICY = RolloutPolicy.load(SETTINGS.rollout_policy)
    POLICY_ERROR = None
except ValueError as exc:  # the DAG still parses; plan_rollout fails with the message
    POLICY, POLICY_ERROR = RolloutPolicy(), str(exc)


def _policy() -> RolloutPolicy:
    if POLICY_ERROR:
        raise AirflowFailException(POLICY_ERROR)
    return POLICY


@dag(
    schedule=[CANDIDATE_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "registry", "serving"],
    doc_md=__doc__,
    params={
        "candidate_version": Param(
            None, type=["null", "integer"], minimum=1, title="Candidate version",
            description="The model version to roll out. Empty: the version the registry's candidate alias names "
            "(set by finetune_model when a candidate passes the gate under a rollout policy).",
        ),
        "prompt": Param(
            None, type=["null", "string"], pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", title="Prompt",
            description="Roll out a version of this prompt template (its candidate alias, or candidate_version) "
            "instead of a model version. Empty: a model.",
        ),
        "mode": Param(
            "policy", type="string", enum=["policy", "canary", "shadow"], title="Mode",
            values_display={"policy": "the policy's (rollout.yaml; canary when it says off)",
                            "canary": "canary: a growing share of users",
                            "shadow": "shadow: answers into the log only"},
            description="canary: a growing share of users (steps in rollout.yaml) gets the candidate. shadow: the "
            "champion answers everything and the candidate answers the same requests in the background, into the "
            "request log only.",
        ),
    },
)
def rollout_model():
    @task
    def plan_rollout() -> dict:
        from nightshift.pipelines.rollout import RolloutRefused
        from nightshift.pipelines.rollout import plan_rollout as plan
        from nightshift.stores import registry_for

        params = get_current_context()["params"]
        mode = None if params["mode"] in (None, "policy") else params["mode"]
        with fail_fast(RolloutRefused):  # no candidate, not gated, already champion, a bad mode
            if params.get("prompt"):
                from nightshift.pipelines.rollout import plan_prompt_rollout
                from nightshift.stores import prompt_registry_for

                planned = plan_prompt_rollout(prompt_registry_for(SETTINGS), params["prompt"],
                                              params["candidate_version"], mode, _policy())
            else:
                planned = plan(registry_for(SETTINGS), params["candidate_version"], mode, _policy())
        print(planned["message"])
        return planned

    @task
    def set_share(plan: dict, index: int) -> dict:
        from nightshift.pipelines.rollout import RolloutRefused, set_step
        from nightshift.stores import registry_for

        with fail_fast(RolloutRefused):  # the candidate alias moved away
            if plan.get("prompt"):
                from nightshift.pipelines.rollout import set_prompt_step
                from nightshift.stores import prompt_registry_for

                return set_prompt_step(prompt_registry_for(SETTINGS), plan, index, _policy())
            return set_step(registry_for(SETTINGS), plan, index, _policy())

    @task.sensor(poke_interval=POLICY.poke_seconds, timeout=POLICY.max_step_minutes * 60,
                 mode="reschedule" if POLICY.poke_seconds >= 60 else "poke")
    def observe(plan: dict, step: dict) -> PokeReturnValue:
        from nightshift.airflow.connections import judge_endpoint
        from nightshift.pipelines.rollout import live_judge, observe_step, request_log_for

        policy = _policy()
        with fail_fast(ValueError):  # a broken suite or judge connection does not mend itself on a later poke
            judge, note = live_judge(SETTINGS, judge_endpoint) if policy.judge_sample else (None, "judge_sample is 0")
        request_log = request_log_for(SETTINGS)
        try:
            verdict = observe_step(request_log, plan, step, policy, judge=judge, judge_note=note)
        finally:
            request_log.engine.dispose()
        for reason in verdict["reasons"]:
            print(f"step {step['step']}: {reason}")
        if verdict["ready"] and not verdict["passed"]:
            raise AirflowFailException(f"step {step['step']} failed: " + "; ".join(
                r for r in verdict["reasons"] if "FAILED" in r))
        return PokeReturnValue(is_done=verdict["ready"], xcom_value=verdict)

    @task(trigger_rule="all_done", outlets=[CHAMPION_ASSET])
    def finish_rollout(plan: dict | None) -> dict:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.pipelines.rollout import finish_rollout as finish
        from nightshift.pipelines.rollout import outcome_alert
        from nightshift.registry.history import ChampionConflict
        from nightshift.stores import registry_for

        context = get_current_context()
        if not plan:
            raise AirflowFailException("plan_rollout failed: nothing was exposed, the champion keeps all traffic")
        ti, run = context["ti"], current_run(SETTINGS, context)
        verdicts = [ti.xcom_pull(task_ids=f"step_{i + 1}_observe") for i in range(len(plan["steps"]))]
        if plan.get("prompt"):
            from nightshift.pipelines.rollout import finish_prompt_rollout
            from nightshift.registry.prompt_registry import PromptConflict
            from nightshift.stores import prompt_registry_for

            with fail_fast(PromptConflict, prefix="the prompt was not promoted and its canary has ended: "):
                outcome = finish_prompt_rollout(prompt_registry_for(SETTINGS), plan, verdicts, f"{run.key}/promote",
                                                run.started_by, run.key)
            send_alert(outcome_alert(plan, outcome, run.dag_id, run.run_id, ti.task_id))
            if outcome["outcome"] != "promoted":
                raise AirflowFailException("rolled back: " + "; ".join(outcome["reasons"][-3:]))
            # Not a model promotion: the event names the prompt, and no dataset version (ingest_corpus reads none).
            context["outlet_events"][CHAMPION_ASSET].extra = {"prompt": outcome["prompt"],
                                                              "prompt_version": outcome["candidate"]}
            return outcome
        # The rollout has ended; the failure's alert says why.
        with fail_fast(ChampionConflict, prefix="the candidate was not promoted and its rollout has ended: "):
            outcome = finish(registry_for(SETTINGS), plan, verdicts, f"{run.key}/promote", run.started_by, run.key)
        send_alert(outcome_alert(plan, outcome, run.dag_id, run.run_id, ti.task_id))
        promoted = outcome["outcome"] == "promoted"
        if promoted:
            context["outlet_events"][CHAMPION_ASSET].extra = {
                "model_version": outcome["candidate"], "dataset_version": plan["candidate"]["dataset_tag"]}
        else:
            raise AirflowFailException("rolled back: " + "; ".join(outcome["reasons"][-3:]))
        return outcome

    plan = plan_rollout()
    previous = plan
    for index in range(len(POLICY.steps)):
        share = set_share.override(task_id=f"step_{index + 1}_share")(plan, index)
        watched = observe.override(task_id=f"step_{index + 1}_observe")(plan, share)
        previous >> share
        previous = watched
    previous >> finish_rollout(plan)


rollout_model()
