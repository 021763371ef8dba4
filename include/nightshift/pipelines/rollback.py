"""Steps of a rollback: choose the target, prove it still loads, move the champion alias and record why.

Every check runs before the alias moves: a target that does not exist, was never evaluated, or no longer
loads fails the run while the champion keeps serving. Rolling back to the current champion changes nothing.
The move happens only while the champion is still the one the plan saw (a compare-and-set under the
registry's release lease): a promotion in between fails the rollback instead of being silently undone.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from nightshift.evaluation.harness import load_check
from nightshift.pipelines.finetune import EVALUATION_REPORT_TAG, EVALUATION_RUN_TAG, GATE_TAG
from nightshift.records import ChampionMove, ModelVersionRecord
from nightshift.registry.history import MAX_REASON_CHARS, PromotionHistory
from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.settings import Settings

log = logging.getLogger(__name__)


class RollbackRefused(ValueError):
    """The rollback cannot happen as asked; the message says what to change."""


@dataclass(frozen=True)
class RollbackRequest:
    target_version: int | None
    """None: the version that was champion before the current one."""
    reason: str

    def __post_init__(self) -> None:
        if self.target_version is not None and (not isinstance(self.target_version, int)
                                                or isinstance(self.target_version, bool) or self.target_version < 1):
            raise RollbackRefused("target_version must be a positive integer, or empty for the previous champion")
        if not isinstance(self.reason, str) or len(self.reason.strip()) < 3:
            raise RollbackRefused("a reason is required (at least 3 characters): it is kept in the promotion history")
        if len(self.reason) > MAX_REASON_CHARS:
            raise RollbackRefused(f"the reason is longer than {MAX_REASON_CHARS} characters")


def previous_champion(history: PromotionHistory, champion: ModelVersionRecord) -> int:
    for move in reversed(history.moves()):
        if move.to_version == champion.version and move.from_version is not None:
            return move.from_version
    raise RollbackRefused(f"the promotion history records no version before {champion.label}: "
                          "give target_version")


def evaluation_of(registry: ModelRegistry, version: ModelVersionRecord) -> dict[str, str]:
    """Return the evaluation that let a version through the gate; raise RollbackRefused if it never had one."""
    tags = registry.version_tags(version.version)
    if tags.get(GATE_TAG) != "passed" and version.run_id:
        run_tags = registry.client.get_run(version.run_id).data.tags
        if run_tags.get(GATE_TAG) == "passed":
            tags = {**tags, EVALUATION_RUN_TAG: version.run_id,
                    EVALUATION_REPORT_TAG: run_tags.get(EVALUATION_REPORT_TAG, "")}
        else:
            tags = {}
    if not tags.get(EVALUATION_RUN_TAG) and tags.get(GATE_TAG) != "passed":
        raise RollbackRefused(f"{version.label} was never evaluated (no gate decision is recorded for it): "
                              "only a version that passed the gate can become champion")
    return {"run_id": tags.get(EVALUATION_RUN_TAG, version.run_id), "report": tags.get(EVALUATION_REPORT_TAG, "")}


def plan_rollback(registry: ModelRegistry, request: RollbackRequest) -> dict[str, Any]:
    """Return the target and the current champion, or ``noop`` with a message when the target already serves."""
    from mlflow.exceptions import MlflowException

    champion = registry.champion()
    if champion is None:
        raise RollbackRefused(f"{registry.model_name} has no champion yet: there is nothing to roll back")
    history = PromotionHistory(registry)
    wanted = request.target_version or previous_champion(history, champion)
    try:
        target = registry.get(wanted)
    except MlflowException:
        known = ", ".join(f"v{v.version}" for v in registry.versions()) or "none"
        raise RollbackRefused(f"{registry.model_name} has no version {wanted} (versions: {known})") from None
    if target.version == champion.version:
        return {"noop": True, "target": target.to_dict(), "champion": champion.to_dict(),
                "message": f"{target.label} is already the champion: nothing to roll back"}
    evidence = evaluation_of(registry, target)
    return {"noop": False, "target": target.to_dict(), "champion": champion.to_dict(), "evaluation": evidence,
            "message": f"roll back from {champion.label} to {target.label}"}


def check_target(settings: Settings, registry: ModelRegistry, target: ModelVersionRecord) -> dict[str, Any]:
    """Download the target (checked against its manifest) and load it with transformers; raise if it cannot."""
    cache = settings.cache_dir / "rollback"
    try:
        folder = registry.download(target, cache)
        result = load_check(folder)
    except Exception as exc:
        raise RollbackRefused(f"{target.label} no longer loads ({type(exc).__name__}: {str(exc)[:300]}); "
                              "the champion keeps serving") from exc
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    log.info("%s loads and answers (loss %.3f, %.1fs)", target.label, result["loss"], result["seconds"])
    return result


def move_champion(
    registry: ModelRegistry, plan: dict[str, Any], key: str, by: str, dag_run: str, reason: str,
) -> ChampionMove | None:
    """Move the alias to the target and return the recorded move (None: the target already serves).

    Only while the champion is still the one the plan saw: otherwise the history's ChampionConflict is raised.
    """
    target = ModelVersionRecord.from_dict(plan["target"])
    return PromotionHistory(registry).move(target, key, "rollback", by, dag_run, reason, plan.get("evaluation"),
                                           expected=plan["champion"]["version"])


def rollback_alert(settings: Settings, move: dict[str, Any], dag_id: str, run_id: str, task_id: str):
    """Return the alert that tells people the champion was rolled back (never the reason: the history keeps it)."""
    from nightshift.alerts.channels import Alert

    return Alert(
        title=f"champion rolled back to v{move['to_version']}",
        message=f"{settings.registered_model}@{settings.champion_alias} moved from v{move['from_version']} to "
        f"v{move['to_version']} by {move.get('by', 'unknown')}. The endpoint serves it within seconds. "
        "The reason is in the promotion history: nightshift history.",
        severity="warning", dag_id=dag_id, run_id=run_id, task_id=task_id,
        details={k: move.get(k) for k in ("from_version", "to_version", "by", "dag_run", "at")},
    )
