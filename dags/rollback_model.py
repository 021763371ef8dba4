"""
# rollback_model

Move the `champion` alias back to an earlier model version, from **Trigger**: the endpoint serves it
within seconds (it polls the registry), and the move is kept in the promotion history with your reason.

| Param | |
|---|---|
| `target_version` | the version to serve; empty: the version that was champion before the current one |
| `reason` | required; kept in the registry's promotion history (`nightshift history`), never in logs or alerts |

| task | does |
|---|---|
| `plan_rollback` | finds the target; refuses one that does not exist or never passed the gate |
| `already_champion` | the target is the champion already: nothing changes, the log says so |
| `check_target` | downloads the target, checks it against its manifest, loads it with transformers and answers |
| `move_champion` | moves the alias and records the move (from, to, when, who, why, the target's evaluation), |
|  | only if the champion is still the one `plan_rollback` saw; else fails and alerts, history unchanged |
| `announce` | alerts the team that the champion changed |

Every check runs before the alias moves: a failed run leaves the champion serving.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from nightshift.airflow.common import CHAMPION_ASSET, DEFAULT_ARGS, current_run, fail_fast
from nightshift.settings import load_settings

SETTINGS = load_settings()


def _request():
    """Return the person's request; its reason stays out of XCom (the history keeps it, nothing else)."""
    from nightshift.pipelines.rollback import RollbackRequest

    p = get_current_context()["params"]
    return RollbackRequest(target_version=p["target_version"], reason=p["reason"])


def _refusals() -> tuple[type[Exception], ...]:
    from nightshift.pipelines.rollback import RollbackRefused
    from nightshift.registry.history import ChampionConflict

    return RollbackRefused, ChampionConflict


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "registry"],
    doc_md=__doc__,
    params={
        "target_version": Param(
            None, type=["null", "integer"], minimum=1, title="Target version",
            description="The model version to serve again. Empty: the version that was champion before the "
            "current one (from the promotion history).",
        ),
        "reason": Param(
            type="string", minLength=3, maxLength=1000, title="Reason",
            description="Why you roll back (required). Kept in the promotion history for whoever asks later; "
            "not written to logs or alerts.",
        ),
    },
)
def rollback_model():
    @task
    def plan_rollback() -> dict:
        from nightshift.pipelines.rollback import plan_rollback as plan
        from nightshift.stores import registry_for

        with fail_fast(*_refusals()):
            planned = plan(registry_for(SETTINGS), _request())
        print(planned["message"])
        return planned

    @task.branch
    def route(plan: dict) -> str:
        return "already_champion" if plan["noop"] else "check_target"

    @task
    def already_champion(plan: dict) -> str:
        print(f"{plan['message']}; the alias and the history stay as they are")
        return plan["message"]

    @task
    def check_target(plan: dict) -> dict:
        from nightshift.pipelines.rollback import check_target as check
        from nightshift.records import ModelVersionRecord
        from nightshift.stores import registry_for

        with fail_fast(*_refusals()):
            return check(SETTINGS, registry_for(SETTINGS), ModelVersionRecord.from_dict(plan["target"]))

    @task(outlets=[CHAMPION_ASSET])
    def move_champion(plan: dict, _checked: dict) -> dict:
        from nightshift.pipelines.rollback import move_champion as move
        from nightshift.stores import registry_for

        context = get_current_context()
        run = current_run(SETTINGS, context)
        with fail_fast(*_refusals()):
            moved = move(registry_for(SETTINGS), plan, f"{run.key}/move", run.started_by, run.key, _request().reason)
        target = plan["target"]
        context["outlet_events"][CHAMPION_ASSET].extra = {
            "model_version": target["version"], "dataset_version": target["dataset_tag"],
        }
        if moved is None:
            return {"to_version": target["version"], "from_version": target["version"]}
        return {k: v for k, v in moved.to_dict().items() if k != "reason"}  # the history keeps it, not XCom

    @task
    def announce(move: dict) -> None:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.pipelines.rollback import rollback_alert

        run = current_run(SETTINGS)
        send_alert(rollback_alert(SETTINGS, move, run.dag_id, run.run_id, "announce"))

    plan = plan_rollback()
    routed = route(plan)
    noop = already_champion(plan)
    checked = check_target(plan)
    routed >> [noop, checked]
    announce(move_champion(plan, checked))


rollback_model()
