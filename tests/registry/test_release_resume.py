"""A champion move interrupted between its record and its end, then retried after other moves: the retry places
itself by the moves recorded since (it was made before them, never happened, or happened again after an A-B-A)
and never undoes them; and a registry that cannot be read is never read as "no champion"."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.exceptions import MlflowException

from helpers import mlflow_store
from nightshift.faults import InjectedFault
from nightshift.pipelines.rollback import previous_champion
from nightshift.registry.common import PROMOTED_TAG
from nightshift.registry.history import NO_CHAMPION, ChampionConflict, PromotionHistory, parse_time
from nightshift.registry.mlflow_registry import ModelRegistry
from nightshift.registry.rollout_state import Rollouts


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(mlflow_store(tmp_path / "mlflow.db"), "resume-llm", (tmp_path / "artifacts").as_uri())


def add_versions(registry, count=3):
    """Register ``count`` versions with no checkpoint: moving an alias never reads one."""
    registry.client.create_registered_model(registry.model_name)
    for i in range(count):
        registry.client.create_model_version(registry.model_name, f"{registry.artifact_root}/none/{i}", tags={})
    return [registry.get(n) for n in range(1, count + 1)]


def chain(registry):
    return [(m.from_version, m.to_version, m.kind) for m in PromotionHistory(registry).moves(include_pending=True)]


def interrupted(monkeypatch, point, move):
    """Run ``move`` with its worker failing at the fault point ``point``."""
    monkeypatch.setenv("NIGHTSHIFT_FAULT", f"{point}:raise")
    with pytest.raises(InjectedFault):
        move()
    monkeypatch.delenv("NIGHTSHIFT_FAULT")


def promote(history, version, night, expected):
    return history.move(version, f"night-{night}/promote", "promotion", "schedule", f"finetune_model/night-{night}",
                        "gate", expected=expected)


def roll_back(history, version, expected):
    return history.move(version, "rb/move", "rollback", "ada", "rollback_model/rb", "bad answers", expected=expected)


@pytest.mark.parametrize("ahead", [True, False])
def test_workers_whose_clocks_disagree_still_order_moves_as_they_happened(registry, monkeypatch, ahead):
    """The interrupted promotion's worker runs 5 s ahead of (or behind) the operator's: stamps taken under the
    lease never go back past a recorded one, so its retry still sees the rollback as later."""
    from datetime import UTC, datetime, timedelta

    import nightshift.registry.history as history_module

    v1, v2, _ = add_versions(registry)
    history = PromotionHistory(registry)
    promote(history, v1, 1, NO_CHAMPION)
    skew = timedelta(seconds=5 if ahead else -5)
    right = history_module.now_iso

    def skewed() -> str:
        return (datetime.now(UTC) + skew).isoformat(timespec="microseconds")

    monkeypatch.setattr(history_module, "now_iso", skewed)
    interrupted(monkeypatch, "registry.after_alias", lambda: promote(history, v2, 2, 1))
    monkeypatch.setattr(history_module, "now_iso", right)
    roll_back(history, v1, expected=2)
    monkeypatch.setattr(history_module, "now_iso", skewed)
    promote(history, v2, 2, 1)  # the retry, on the skewed worker
    assert registry.champion().version == 1  # the rollback stands
    assert chain(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]


@pytest.mark.parametrize("rollback_to", [1, 3])
def test_a_move_interrupted_after_the_alias_is_recorded_as_made_before_the_moves_since(registry, monkeypatch,
                                                                                        rollback_to):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    promote(history, v1, 1, NO_CHAMPION)
    interrupted(monkeypatch, "registry.after_alias", lambda: promote(history, v2, 2, 1))
    assert registry.champion().version == 2  # v2 serves; its record is still pending
    roll_back(history, registry.get(rollback_to), expected=2)  # an operator's rollback from v2
    done = promote(history, v2, 2, 1)  # Airflow's retry of the interrupted promotion
    assert registry.champion().version == rollback_to  # the rollback stands
    assert chain(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, rollback_to, "rollback")]
    assert (done.from_version, done.to_version, done.state) == (1, 2, "done")
    assert done.at == done.requested_at  # made when it was requested, before the rollback
    assert registry.version_tags(2)[PROMOTED_TAG]  # it did serve
    assert history.champion_at(parse_time(done.at))["version"] == 2
    assert previous_champion(history, registry.champion()) == 2


def test_a_move_that_never_reached_the_alias_is_dropped_when_others_made_its_target_champion(registry, monkeypatch):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    promote(history, v1, 1, NO_CHAMPION)
    interrupted(monkeypatch, "history.before_alias", lambda: promote(history, v2, 2, 1))
    promote(history, v3, 3, 1)
    roll_back(history, v2, expected=3)
    assert promote(history, v2, 2, 1) is None  # v2 is champion already: nothing to move, nothing to record
    assert history.get("night-2/promote").state == "aborted"
    assert chain(registry) == [(None, 1, "promotion"), (1, 3, "promotion"), (3, 2, "rollback")]
    assert previous_champion(history, registry.champion()) == 3


def test_a_move_that_never_happened_is_made_after_an_a_b_a_and_a_second_interruption_is_placed_right(
        registry, monkeypatch):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    promote(history, v1, 1, NO_CHAMPION)
    interrupted(monkeypatch, "history.before_alias", lambda: promote(history, v3, 3, 1))
    promote(history, v2, 2, 1)
    roll_back(history, v1, expected=2)  # the champion is v1 again: what the promotion of v3 was evaluated against
    # The retry moves the alias and is interrupted again; its record now says it was requested after the rollback.
    interrupted(monkeypatch, "registry.after_alias", lambda: promote(history, v3, 3, 1))
    done = promote(history, v3, 3, 1)
    assert (done.from_version, done.to_version, done.state) == (1, 3, "done")
    assert registry.champion().version == 3
    assert chain(registry) == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback"), (1, 3, "promotion")]


def test_a_pending_move_whose_alias_was_moved_outside_nightshift_is_aborted_without_claiming_nothing_moved(
        registry, monkeypatch):
    v1, v2, v3 = add_versions(registry)
    history = PromotionHistory(registry)
    promote(history, v1, 1, NO_CHAMPION)
    interrupted(monkeypatch, "history.before_alias", lambda: promote(history, v2, 2, 1))
    registry.client.set_registered_model_alias(registry.model_name, registry.alias, "3")  # by hand, in MLflow's UI
    with pytest.raises(ChampionConflict, match="is now v3, but this promotion to v2 was evaluated against v1") as err:
        promote(history, v2, 2, 1)
    assert "cannot be told" in str(err.value) and "nothing was moved" not in str(err.value)
    assert registry.champion().version == 3 and history.get("night-2/promote").state == "aborted"


class Replies(BaseHTTPRequestHandler):
    """An MLflow tracking server that answers every call with one error, as a busy or broken one does."""

    reply: tuple[int, dict] = (500, {})

    def do_GET(self):  # noqa: N802 (http.server's handler name)
        status, body = self.reply
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mlflow_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Replies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "code", "message", "missing"), [
    (404, "RESOURCE_DOES_NOT_EXIST", "Registered Model with name=resume-llm not found", True),
    (400, "INVALID_PARAMETER_VALUE", "Registered model alias champion not found.", True),
    (503, "TEMPORARILY_UNAVAILABLE", "(sqlite3.OperationalError) database is locked", False),
    (500, "INTERNAL_ERROR", "the backend store is unreachable", False),
])
def test_only_a_missing_model_or_alias_reads_as_no_champion(mlflow_server, monkeypatch, status, code, message,
                                                            missing):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(Replies, "reply", (status, {"error_code": code, "message": message}))
    registry = ModelRegistry(f"http://127.0.0.1:{mlflow_server.server_port}", "resume-llm", "file:///unused")
    reads = (registry.champion, Rollouts(registry).current, PromotionHistory(registry).moves)
    for read in reads:
        if missing:
            assert read() in (None, [])
        else:
            with pytest.raises(MlflowException):  # Airflow retries the task; nothing acts on a blind read
                read()


def test_on_sqlite_a_model_or_alias_that_does_not_exist_is_no_champion(registry):
    assert registry.champion() is None and Rollouts(registry).current() is None  # no registered model
    add_versions(registry, 1)
    assert registry.champion() is None and Rollouts(registry).current() is None  # no alias
