"""The promotion history lives in the registry's metadata store and survives a move killed at any line."""

import time
from datetime import UTC, datetime, timedelta

import pytest

from helpers import mlflow_store
from nightshift.faults import InjectedFault
from nightshift.registry.history import MOVE_TAG, PromotionHistory, parse_time
from nightshift.registry.mlflow_registry import ModelRegistry


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(mlflow_store(tmp_path / "mlflow.db"), "test-llm", (tmp_path / "artifacts").as_uri())


@pytest.fixture
def versions(registry, tiny_model):
    out = []
    for key in ("a", "b", "c"):
        run_id = registry.open_run("exp", key, key, tags={})
        registry.upload_checkpoint(run_id, tiny_model)
        out.append(registry.register(run_id, tags={}))
    return out


def test_moves_are_listed_and_answer_who_was_champion_when(registry, versions):
    history = PromotionHistory(registry)
    before = datetime.now(UTC)
    time.sleep(0.01)
    first = history.move(versions[0], "run-1/promote", "promotion", "schedule", "finetune_model/run-1", "gate passed",
                         {"run_id": versions[0].run_id, "report": "runs:/x/evaluation/report.html"})
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    second = history.move(versions[1], "run-2/promote", "promotion", "ada", "finetune_model/run-2", "gate passed")
    time.sleep(0.01)
    rollback = history.move(versions[0], "rb-1/move", "rollback", "grace", "rollback_model/rb-1", "answers got worse")

    moves = history.moves()
    assert [(m.from_version, m.to_version, m.kind) for m in moves] == [(None, 1, "promotion"), (1, 2, "promotion"),
                                                                        (2, 1, "rollback")]
    assert moves[0] == first and moves[1] == second and moves[2] == rollback
    assert moves[2].by == "grace" and moves[2].reason == "answers got worse" and moves[2].state == "done"
    assert moves[0].evaluation["report"] == "runs:/x/evaluation/report.html"
    assert history.champion_at(before)["version"] is None
    assert history.champion_at(between) == {"version": 1, "since": first.at, "move": first.id}
    assert history.champion_at(parse_time(second.at))["version"] == 2
    assert history.champion_at(datetime.now(UTC) + timedelta(days=1))["version"] == 1
    assert registry.champion().version == 1
    # Stored as tags of the registered model: the registry's own database, no file of ours.
    tags = registry.client.get_registered_model("test-llm").tags
    assert sum(k.startswith(MOVE_TAG) for k in tags) == 3


def test_moving_to_the_champion_records_nothing(registry, versions):
    history = PromotionHistory(registry)
    history.move(versions[0], "k1", "promotion", "schedule", "d/r1", "why")
    assert history.move(versions[0], "k2", "rollback", "ada", "d/r2", "again") is None
    assert len(history.moves()) == 1


@pytest.mark.parametrize("point", ["history.before_alias", "registry.after_alias"])
def test_a_move_killed_at_any_step_is_finished_by_its_retry_with_the_original_from_version(
    registry, versions, monkeypatch, point
):
    history = PromotionHistory(registry)
    history.move(versions[0], "k0", "promotion", "schedule", "d/r0", "first")
    monkeypatch.setenv("NIGHTSHIFT_FAULT", f"{point}:raise")
    with pytest.raises(InjectedFault):
        history.move(versions[1], "k1", "promotion", "schedule", "d/r1", "second")
    pending = history.moves(include_pending=True)[-1]
    assert pending.state == "pending" and pending.from_version == 1 and history.moves()[-1].to_version == 1
    monkeypatch.delenv("NIGHTSHIFT_FAULT")
    done = history.move(versions[1], "k1", "promotion", "schedule", "d/r1", "second")
    assert (done.from_version, done.to_version, done.state) == (1, 2, "done")
    assert [m.to_version for m in history.moves(include_pending=True)] == [1, 2]
    assert registry.champion().version == 2
    # A second retry after success changes nothing.
    assert history.move(versions[1], "k1", "promotion", "schedule", "d/r1", "second") == done


def test_times_without_a_zone_are_utc_and_nonsense_is_refused():
    assert parse_time("2026-12-01T09:30:00") == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    assert parse_time("2026-12-01T09:30:00Z") == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")
