"""History and rollback end to end: promote v1, promote v2, roll back to v1 with dag.test(), while a real
endpoint serves; then the refusals (the champion already, never evaluated, missing, no longer loads)."""

import json
import re
import shutil
import time
from datetime import UTC, datetime

import httpx
import pytest

from cli_helpers import fresh, run
from helpers import UvicornThread, mlflow_store, ready, wait_for

pytestmark = pytest.mark.e2e

REASON = "v2 answers opening hours wrong (ticket 4711)"


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return settings


def register(registry, folder, key, evaluated=True):
    from nightshift.pipelines.finetune import EVALUATION_REPORT_TAG, EVALUATION_RUN_TAG, GATE_TAG

    run_id = registry.open_run("finetune_model", key, key, {})
    registry.upload_checkpoint(run_id, folder)
    tags = {"nightshift.dataset_tag": f"corpus-{key}"}
    if evaluated:
        tags.update({GATE_TAG: "passed", EVALUATION_RUN_TAG: run_id,
                     EVALUATION_REPORT_TAG: f"runs:/{run_id}/evaluation/report.html"})
    return registry.register(run_id, tags=tags)


def test_promote_promote_roll_back_and_the_endpoint_follows(home, tiny_model, tmp_path):
    from nightshift.pipelines.finetune import promote_candidate
    from nightshift.registry.history import PromotionHistory, parse_time
    from nightshift.serving.app import create_app
    from nightshift.stores import registry_for

    registry = registry_for(home)
    v1, v2 = register(registry, tiny_model, "one"), register(registry, tiny_model, "two")
    promote_candidate(registry, v1, "finetune_model/night-1/promote", "schedule", "finetune_model/night-1",
                      "heldout.perplexity ok", champion_before=None)
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    promote_candidate(registry, v2, "finetune_model/night-2/promote", "schedule", "finetune_model/night-2",
                      "heldout.perplexity ok", champion_before=v1.to_dict())

    with UvicornThread(create_app(registry, tmp_path / "serving", require_key=False, poll_seconds=0.2)) as server:
        wait_for(lambda: (ready(server.url) or {}).get("version") == 2, what="v2 to serve")

        dag_run, tasks = run(fresh("rollback_model"), {"target_version": 1, "reason": REASON})
        assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
        assert tasks["already_champion"].state == "skipped" and tasks["check_target"].state == "success"
        moved_at = time.monotonic()
        assert registry.champion().version == 1
        wait_for(lambda: (ready(server.url) or {}).get("version") == 1, what="the endpoint to serve v1 again",
                 timeout=60)
        switched = time.monotonic() - moved_at
        assert switched < 30, switched

        history = PromotionHistory(registry)
        moves = history.moves()
        assert [(m.from_version, m.to_version, m.kind) for m in moves] == [
            (None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
        assert moves[-1].reason == REASON and moves[-1].dag_run.startswith("rollback_model/")
        assert moves[-1].evaluation["report"].endswith("evaluation/report.html")
        assert history.champion_at(between)["version"] == 1
        assert history.champion_at(parse_time(moves[1].at))["version"] == 2

        # The endpoint answers the same questions.
        body = httpx.get(f"{server.url}/v1/champion/history", params={"at": between.isoformat()}).json()
        assert body["champion"]["version"] == 1 and len(body["moves"]) == 3
        assert httpx.get(f"{server.url}/v1/champion/history", params={"at": "soon"}).status_code == 400

    alerts = [json.loads(line) for line in (home.home / "alerts" / "alerts.jsonl").read_text().splitlines()]
    assert "rolled back to v1" in alerts[-1]["title"] and "from v2 to v1" in alerts[-1]["message"]
    assert "4711" not in json.dumps(alerts)  # the reason is a person's text: history only, never an alert
    assert "4711" not in json.dumps([r.value for r in tasks.values()], default=str)  # nor in XCom (the UI shows it)

    # Rolling back to the champion changes nothing and says so.
    dag_run, tasks = run(fresh("rollback_model"), {"target_version": 1, "reason": "just in case"})
    assert dag_run.state == "success" and tasks["already_champion"].state == "success"
    assert "already the champion" in tasks["already_champion"].value
    assert tasks["move_champion"].state == "skipped" and len(PromotionHistory(registry).moves()) == 3

    # No target: the version before the current champion (v2 here, from the history).
    dag_run, tasks = run(fresh("rollback_model"), {"target_version": None, "reason": "v2 was fine after all"})
    assert dag_run.state == "success" and registry.champion().version == 2


def test_targets_that_are_missing_unevaluated_or_broken_fail_before_the_alias_moves(home, tiny_model, tmp_path):
    from nightshift.pipelines.rollback import RollbackRefused, RollbackRequest, check_target, plan_rollback
    from nightshift.records import ModelVersionRecord
    from nightshift.registry.history import PromotionHistory
    from nightshift.stores import registry_for

    registry = registry_for(home)
    good = register(registry, tiny_model, "good")
    registry.promote(good, key="k/good")
    unevaluated = register(registry, tiny_model, "unevaluated", evaluated=False)
    broken_dir = shutil.copytree(tiny_model, tmp_path / "broken")
    (broken_dir / "config.json").unlink()
    broken = register(registry, broken_dir, "broken")

    for target, failed_task, message in [
        (unevaluated.version, "plan_rollback", "was never evaluated"),
        (99, "plan_rollback", "has no version 99 (versions: v1, v2, v3)"),
        (broken.version, "check_target", "no longer loads"),
    ]:
        dag_run, tasks = run(fresh("rollback_model"), {"target_version": target, "reason": "try it"})
        assert dag_run.state == "failed" and tasks[failed_task].state == "failed", message
        assert tasks["move_champion"].state in ("upstream_failed", "skipped")
        assert registry.champion().version == good.version
        assert len(PromotionHistory(registry).moves()) == 1
        with pytest.raises(RollbackRefused, match=re.escape(message)):  # what the failed task said
            plan = plan_rollback(registry, RollbackRequest(target, "try it"))
            check_target(home, registry, ModelVersionRecord.from_dict(plan["target"]))
