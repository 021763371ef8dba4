"""Champion moves through the DAGs (dag.test) when the champion changes under them: a rollout or a promotion
decided against a champion that an operator has since rolled back fails, alerts and leaves the rollback and the
history alone; a retried move whose champion moved between its tries aborts; with no champion at all a rollout
is refused and leaves no candidate exposed, and finetune_model promotes directly."""

import json

import pytest

from cli_helpers import fresh, run
from helpers import mlflow_store

pytestmark = pytest.mark.e2e

POLICY = """
mode: canary
steps: [0.5]
step_minutes: 0.001
max_step_minutes: 1
min_answers: 1
judge_sample: 0
"""
REASON = "v2 answers opening hours wrong (ticket 4711)"
EVEN = {"answers": 40, "errors": 0, "p95_seconds": 0.2, "ratings": 0, "negative_share": 0.0}


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_FAULT_DIR", str(tmp_path))
    (tmp_path / "rollout.yaml").write_text(POLICY)
    monkeypatch.setenv("NIGHTSHIFT_ROLLOUT_POLICY", str(tmp_path / "rollout.yaml"))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    settings.serving_dir.mkdir(parents=True, exist_ok=True)  # the request log the observe step opens
    return settings


def gated_versions(registry, count):
    """Register ``count`` versions that passed the gate; the rollout steps here never load their weights."""
    from nightshift.pipelines.finetune import GATE_TAG

    registry.client.create_registered_model(registry.model_name)
    for i in range(count):
        registry.client.create_model_version(registry.model_name, f"{registry.artifact_root}/none/{i}",
                                             tags={GATE_TAG: "passed", "nightshift.dataset_tag": f"corpus-v{i:04d}"})
    return [registry.get(n) for n in range(1, count + 1)]


def history_of(registry):
    from nightshift.registry.history import PromotionHistory

    return [(m.from_version, m.to_version, m.kind) for m in PromotionHistory(registry).moves(include_pending=True)]


def aliases(registry):
    return dict(registry.client.get_registered_model(registry.model_name).aliases or {})


def alerts(settings):
    path = settings.home / "alerts" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def roll_back_to_v1(registry):
    """What an operator's rollback_model run does once its checks pass: plan from the champion, then move."""
    from nightshift.pipelines.rollback import RollbackRequest, move_champion, plan_rollback

    plan = plan_rollback(registry, RollbackRequest(1, REASON))
    return move_champion(registry, plan, "rollback_model/manual/move", "ada", "rollback_model/manual", REASON)


def passing_step(request_log, plan, step, policy, **_):
    """A step whose live signals (the request log) show the candidate no worse than the champion."""
    from nightshift.evaluation.rollout_policy import judge_step

    return judge_step(dict(EVEN), dict(EVEN), policy.step_minutes, policy).to_dict()


@pytest.fixture
def rolling_v3(home, monkeypatch):
    """v1 then v2 promoted; v3 passed the gate and is about to be rolled out against v2."""
    from nightshift.pipelines import rollout
    from nightshift.stores import registry_for

    registry = registry_for(home)
    v1, v2, v3 = gated_versions(registry, 3)
    registry.promote(v1, key="finetune_model/night-1/promote")
    registry.promote(v2, key="finetune_model/night-2/promote")
    monkeypatch.setattr(rollout, "observe_step", passing_step)
    return registry


def test_a_rollout_is_not_promoted_over_a_rollback_made_while_it_ran(home, rolling_v3, monkeypatch):
    from nightshift.pipelines import rollout
    from nightshift.registry.rollout_state import STATE_TAG

    registry = rolling_v3

    def observe_while_an_operator_rolls_back(*args, **kwargs):
        if registry.champion().version == 2:
            roll_back_to_v1(registry)
        return passing_step(*args, **kwargs)

    monkeypatch.setattr(rollout, "observe_step", observe_while_an_operator_rolls_back)
    dag_run, tasks = run(fresh("rollout_model"), {"candidate_version": 3})
    assert dag_run.state == "failed"
    assert tasks["step_1_observe"].state == "success" and tasks["step_1_observe"].value["passed"]
    assert tasks["finish_rollout"].state == "failed"
    assert dag_run.get_task_instance("finish_rollout").try_number == 1  # a conflict is not retried
    assert registry.champion().version == 1  # the rollback stands
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
    assert aliases(registry) == {"champion": 1}  # the candidate no longer takes traffic
    assert registry.version_tags(3)[STATE_TAG] == "conflict"
    alert = alerts(home)[-1]
    assert alert["title"].endswith("rollout_model.finish_rollout failed")
    assert "is now v1, but this rollout to v3 was evaluated against v2" in alert["message"]
    assert "4711" not in json.dumps(alerts(home))  # the operator's reason stays in the history


def test_a_retried_rollout_does_not_undo_a_rollback_made_between_its_tries(home, rolling_v3, monkeypatch):
    from nightshift.pipelines import rollout
    from nightshift.registry.history import PromotionHistory
    from nightshift.registry.rollout_state import STATE_TAG

    registry = rolling_v3
    real_finish, tries = rollout.finish_rollout, []

    def finish_after_a_rollback(*args, **kwargs):
        if tries:  # between the tries: the first left its move pending (v2 -> v3); an operator rolls back
            roll_back_to_v1(registry)
        tries.append(1)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(rollout, "finish_rollout", finish_after_a_rollback)
    monkeypatch.setenv("NIGHTSHIFT_FAULT", "history.before_alias:once")
    dag_run, tasks = run(fresh("rollout_model"), {"candidate_version": 3})
    assert dag_run.state == "failed" and tasks["finish_rollout"].state == "failed"
    assert len(tries) == 2 and dag_run.get_task_instance("finish_rollout").try_number == 2
    assert registry.champion().version == 1
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
    move = PromotionHistory(registry).get(f"rollout_model/{dag_run.run_id}/promote")
    assert (move.from_version, move.to_version, move.state) == (2, 3, "aborted")
    assert aliases(registry) == {"champion": 1} and registry.version_tags(3)[STATE_TAG] == "conflict"
    assert "is now v1" in alerts(home)[-1]["message"]


def test_with_no_champion_a_rollout_is_refused_and_its_candidate_removed_and_finetune_promotes_directly(home):
    from nightshift.evaluation.rollout_policy import RolloutPolicy
    from nightshift.pipelines.rollout import release_route, start_rollout
    from nightshift.registry.rollout_state import STATE_TAG
    from nightshift.stores import registry_for

    registry = registry_for(home)
    policy = RolloutPolicy.load(home.rollout_policy)
    (v1,) = gated_versions(registry, 1)
    # finetune_model's release: canary in rollout.yaml, but nothing to compare with: straight to promote_candidate.
    assert release_route(registry, policy)[0] == "promote"
    # A candidate exposed before this release existed (finetune_model used to start a rollout anyway).
    start_rollout(registry, v1, policy)
    assert aliases(registry) == {"candidate": 1}
    dag_run, tasks = run(fresh("rollout_model"), {})
    assert dag_run.state == "failed" and tasks["plan_rollout"].state == "failed"
    assert dag_run.get_task_instance("plan_rollout").try_number == 1
    assert aliases(registry) == {} and registry.version_tags(1)[STATE_TAG] == "refused"
    assert registry.champion() is None
    assert "no champion to compare a candidate with" in alerts(home)[0]["message"]

    registry.promote(v1, key="finetune_model/night-1/promote", expected="no-champion")
    assert release_route(registry, policy)[0] == "rollout"


def test_finetune_does_not_promote_a_candidate_evaluated_against_a_champion_that_is_gone(home):
    """promote_candidate as finetune_model's task calls it, with evaluate's ``champion_before``. (The whole
    nightly cycle through dag.test, rollback included, takes about 40 s: too long for what it adds here.)"""
    from nightshift.pipelines.finetune import promote_candidate
    from nightshift.registry.history import ChampionConflict
    from nightshift.stores import registry_for

    registry = registry_for(home)
    v1, v2, v3 = gated_versions(registry, 3)
    registry.promote(v1, key="finetune_model/night-1/promote")
    registry.promote(v2, key="finetune_model/night-2/promote")
    roll_back_to_v1(registry)  # while tonight's v3 was being evaluated against v2
    with pytest.raises(ChampionConflict, match="is now v1, but this promotion to v3 was evaluated against v2"):
        promote_candidate(registry, v3, "finetune_model/night-3/promote", "schedule", "finetune_model/night-3",
                          "gate passed", champion_before=v2.to_dict())
    with pytest.raises(ChampionConflict, match="evaluated against no version"):  # against the base model
        promote_candidate(registry, v3, "finetune_model/night-4/promote", "schedule", "finetune_model/night-4",
                          "gate passed", champion_before=None)
    assert registry.champion().version == 1
    assert history_of(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
    promoted = promote_candidate(registry, v3, "finetune_model/night-5/promote", "schedule", "finetune_model/night-5",
                                 "gate passed", champion_before=v1.to_dict())
    assert promoted.version == 3 and history_of(registry)[-1] == (1, 3, "promotion")
