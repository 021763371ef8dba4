"""A prompt canary takes only a version whose latest record is a pass of the gate against the production prompt of
now: never one that was declined or rolled back since, nor one gated against an earlier production version."""

import pytest

from helpers import mlflow_store
from nightshift.evaluation.rollout_policy import RolloutPolicy
from nightshift.pipelines.rollout import RolloutRefused, plan_prompt_rollout
from nightshift.prompts.template import PromptTemplate
from nightshift.registry.prompt_registry import PromptRegistry

POLICY = RolloutPolicy(mode="canary", steps=(0.2, 0.5))


@pytest.fixture
def prompts(tmp_path):
    registry = PromptRegistry(mlflow_store(tmp_path / "mlflow.db"), lease_dir=tmp_path / "locks")
    versions = [registry.register(PromptTemplate("assistant", f"Prompt number {i}."), "", "ada")[0] for i in (1, 2, 3)]
    registry.move(versions[0], key="first", expected=None, kind="promotion", by="ada", dag_run="r", reason="first")
    return registry, versions


def test_a_gated_version_is_planned_and_exposed(prompts):
    registry, (v1, v2, _v3) = prompts
    with pytest.raises(RolloutRefused, match="no standing pass"):
        plan_prompt_rollout(registry, "assistant", 2, None, POLICY)
    registry.note(v2, "canary", key="gate-2", by="ada", dag_run="e1", reason="passed")
    plan = plan_prompt_rollout(registry, "assistant", None if registry.rollout("assistant") else 2, None, POLICY)
    assert (plan["candidate"]["version"], plan["champion"]["version"], plan["mode"]) == (2, 1, "canary")
    assert registry.rollout("assistant")[1] == 0.2
    with pytest.raises(RolloutRefused, match="canary only"):
        plan_prompt_rollout(registry, "assistant", 2, "shadow", POLICY)


def test_a_declined_version_and_a_stale_pass_are_refused(prompts):
    registry, (v1, v2, v3) = prompts
    registry.note(v2, "canary", key="gate-2", by="ada", dag_run="e1", reason="passed")
    registry.decline(v2, key="rolled-back", by="ada", dag_run="rollout-1", reason="rolled back after its canary")
    with pytest.raises(RolloutRefused, match="no standing pass"):
        plan_prompt_rollout(registry, "assistant", 2, None, POLICY)
    registry.note(v3, "canary", key="gate-3", by="ada", dag_run="e2", reason="passed against v1")
    registry.move(v2, key="urgent", expected=1, kind="promotion", by="ops", dag_run="e3", reason="urgent")
    with pytest.raises(RolloutRefused, match="against v1, not against the production prompt of now"):
        plan_prompt_rollout(registry, "assistant", 3, None, POLICY)
