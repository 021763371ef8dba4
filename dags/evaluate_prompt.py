"""
# evaluate_prompt

Release a prompt template like a model: the champion answers the evaluation suite under the candidate prompt
and under the production prompt, in the same harness; the gate of `include/configs/gate.yaml` decides, and a
candidate that passes becomes the prompt the endpoint applies (within its poll, seconds) or goes to a canary.

Prompt templates live in `include/configs/prompts/<name>.yaml` (a system prompt, optional few-shot examples,
variables); `nightshift prompts register` puts a changed template into MLflow's Prompt Registry as a new version,
`nightshift prompts list|diff|history` show them.

| Param | |
|---|---|
| `prompt` | the prompt's name in the registry (`assistant` ships) |
| `version` | the candidate version; empty: the newest registered version |
| `mode` | `promote`: move `production` to it; `canary`: make it the `candidate` prompt for the first share of |
|  | `include/configs/rollout.yaml`'s steps (same sticky routing as a model canary) |
| `reason` | optional; kept in the prompt's history (`nightshift prompts history`), never in logs or alerts |

| task | does |
|---|---|
| `parse_request` | the prompt, the candidate, the production version now, the champion to evaluate with |
| `evaluate` | the champion under each prompt, on `include/configs/evaluation.yaml`'s golden set: answers, format |
|  | (language, length, pattern), refusals, leaks, the judge; paired bootstrap intervals. The production side is |
|  | cached per model, prompt and suite |
| `decide_release` | gate.yaml's rules (held-out text rules skipped: a prompt does not change them); the HTML report |
| `promote_prompt` | moves `production`, only if it still names the version evaluated against; records who and why |
| `canary_prompt` | (`mode: canary`, a production prompt exists) points the prompt's `candidate` alias at it with |
|  | the first share; `rollout_model` (Param `prompt`) steps it on live signals and promotes or rolls it back |
| `decline_prompt` | records the rejection in the prompt's history and alerts with the failed rules |

The run's **Reports** tab shows both prompts' answers side by side and the gate's checks.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from nightshift.airflow.common import DEFAULT_ARGS, current_run, fail_fast
from nightshift.settings import load_settings

SETTINGS = load_settings()


def _steps():
    from nightshift.pipelines import prompt_release

    return prompt_release


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "prompts"],
    doc_md=__doc__,
    params={
        "prompt": Param(
            "assistant", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", title="Prompt",
            description="Name of a registered prompt template (include/configs/prompts/<name>.yaml, registered "
            "with `nightshift prompts register`).",
        ),
        "version": Param(
            None, type=["null", "integer"], minimum=1, title="Candidate version",
            description="The prompt version to evaluate against the production version. Empty: the newest.",
        ),
        "mode": Param(
            "promote", type="string", enum=["promote", "canary"], title="Release",
            values_display={"promote": "Promote at once when it passes", "canary": "Canary (rollout.yaml's share)"},
            description="What a candidate that passes the gate becomes: the production prompt, or the candidate "
            "prompt of a canary.",
        ),
        "reason": Param(
            None, type=["null", "string"], maxLength=500, title="Reason",
            description="Why this prompt changes; kept in the prompt's history, not in logs or alerts.",
        ),
    },
)
def evaluate_prompt():
    @task
    @fail_fast()  # a bad name, a missing version or no champion do not mend on retry
    def parse_request() -> dict:
        run = current_run(SETTINGS)
        params = get_current_context()["params"]
        request = _steps().parse_request(run, {k: params.get(k) for k in ("prompt", "version", "mode")})
        print(f"{request['prompt']} v{request['candidate']} against "
              f"{'v' + str(request['production']) if request['production'] else 'no prompt'}, with "
              f"{request['champion']['name']} v{request['champion']['version']}")
        return request

    @task
    def evaluate(request: dict) -> dict:
        from nightshift.airflow.connections import judge_endpoint
        from nightshift.pipelines.finetune_tasks import load_evaluation

        run = current_run(SETTINGS)
        with fail_fast(ValueError):  # a broken suite, judge connection or too long a prompt
            evaluation = load_evaluation(run, judge_endpoint)
            return _steps().evaluate(run, request, evaluation)

    @task
    def decide_release(request: dict, evaluation: dict) -> dict:
        from nightshift.evaluation.gate import GatePolicy

        with fail_fast(ValueError):  # nor does a broken gate.yaml
            policy = GatePolicy.load(SETTINGS.gate_policy)
        return _steps().decide_release(current_run(SETTINGS), request, evaluation, policy)

    @task.branch
    def route(decision: dict, request: dict) -> str:
        return _steps().route(decision, request)

    @task
    def promote_prompt(request: dict, decision: dict) -> dict:
        from nightshift.registry.prompt_registry import PromptConflict

        reason = get_current_context()["params"].get("reason") or ""
        with fail_fast(PromptConflict):  # evaluated against a production prompt that is gone
            move = _steps().promote(current_run(SETTINGS), {**request, "reason": reason}, decision)
        return {k: v for k, v in move.items() if k != "reason"}  # the history keeps it, not XCom

    @task
    def canary_prompt(request: dict, decision: dict) -> dict:
        from nightshift.evaluation.rollout_policy import RolloutPolicy

        with fail_fast(ValueError):
            share = RolloutPolicy.load(SETTINGS.rollout_policy).steps[0]
        reason = get_current_context()["params"].get("reason") or ""
        return _steps().canary(current_run(SETTINGS), {**request, "reason": reason}, decision, share)

    @task
    def decline_prompt(request: dict, decision: dict) -> dict:
        from nightshift.airflow.notifiers import send_alert

        alert = _steps().decline(current_run(SETTINGS), request, decision)
        send_alert(alert)
        return alert.details

    request = parse_request()
    evaluation = evaluate(request)
    decision = decide_release(request, evaluation)
    routed = route(decision, request)
    routed >> [promote_prompt(request, decision), canary_prompt(request, decision), decline_prompt(request, decision)]


evaluate_prompt()
