"""Prompt versions in MLflow's Prompt Registry: one version per text, also when two processes register at once;
the production alias moved as a compare-and-set with history that a retry finishes; an altered version refused;
the canary's share."""

import json
import multiprocessing
import sys

import pytest

from helpers import mlflow_store
from nightshift.prompts.template import PromptError, PromptTemplate
from nightshift.registry.prompt_registry import (
    DIGEST_TAG,
    MOVE_TAG,
    PRODUCTION,
    VARIABLES_TAG,
    PromptConflict,
    PromptMove,
    PromptRegistry,
    move_id,
)

ONE = PromptTemplate("assistant", "You help {{ org }}.", (("Hi", "Hello!"),), {"org": "Tern"})
TWO = PromptTemplate("assistant", "You help {{ org }}. Be brief.", (), {"org": "Tern"})


@pytest.fixture
def prompts(tmp_path):
    return PromptRegistry(mlflow_store(tmp_path / "mlflow.db"), lease_dir=tmp_path / "locks")


def test_a_text_is_registered_once_and_read_back_as_written(prompts):
    v1, new = prompts.register(ONE, "first", "ada")
    assert new and v1.version == 1 and v1.template == ONE and v1.registered_by == "ada" and v1.message == "first"
    again, new = prompts.register(ONE, "again", "bob")
    assert not new and again.version == 1
    v2, new = prompts.register(TWO, "", "ada")
    assert new and v2.version == 2
    assert [v.version for v in prompts.versions("assistant")] == [1, 2] and prompts.names() == ["assistant"]
    assert prompts.versions("missing") == [] and prompts.by_alias("missing") is None
    with pytest.raises(LookupError, match="has no version 7"):
        prompts.get("assistant", 7)


def _register(url, locks, barrier, out):
    registry = PromptRegistry(url, lease_dir=locks)
    barrier.wait()
    out.put(registry.register(ONE, "racing", "p")[0].version)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_two_processes_registering_one_text_make_one_version(tmp_path):
    url = mlflow_store(tmp_path / "mlflow.db")
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_register, args=(url, tmp_path / "locks", barrier, out)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert sorted(out.get(timeout=5) for _ in workers) == [1, 1, 1]
    assert [v.version for v in PromptRegistry(url, lease_dir=tmp_path / "locks").versions("assistant")] == [1]


def test_production_moves_only_from_the_version_it_was_decided_against(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    v2, _ = prompts.register(TWO, "", "ada")
    first = prompts.move(v1, key="run-1/promote", expected=None, kind="promotion", by="ada", dag_run="run-1",
                         reason="first")
    assert first.state == "done" and prompts.by_alias("assistant").version == 1
    # Decided when there was no production version: refused now, and recorded as such.
    with pytest.raises(PromptConflict, match="names v1 now"):
        prompts.move(v2, key="run-2/promote", expected=None, kind="promotion", by="bob", dag_run="run-2", reason="x")
    assert prompts.by_alias("assistant").version == 1
    # A retry of the refused move is refused again, without a second record.
    with pytest.raises(PromptConflict, match="already refused"):
        prompts.move(v2, key="run-2/promote", expected=1, kind="promotion", by="bob", dag_run="run-2", reason="x")
    moved = prompts.move(v2, key="run-3/promote", expected=1, kind="promotion", by="bob", dag_run="run-3",
                         reason="better")
    assert (moved.from_version, moved.to_version) == (1, 2) and prompts.by_alias("assistant").version == 2
    history = prompts.history("assistant")
    assert [(m.from_version, m.to_version, m.state) for m in history] == [(None, 1, "done"), (1, 2, "aborted"),
                                                                          (1, 2, "done")]
    # The same run asking again changes nothing.
    assert prompts.move(v2, key="run-3/promote", expected=1, kind="promotion", by="bob", dag_run="run-3",
                        reason="better").state == "done"
    assert len(prompts.history("assistant")) == 3


def test_a_move_killed_after_its_alias_is_finished_by_the_retry(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    # What a kill between the alias write and the record's completion leaves: a pending record, the alias moved.
    pending = PromptMove(move_id("run-1/promote"), PRODUCTION, "promotion", None, 1, "ada", "run-1", "first",
                         "2026-12-06T10:00:00+00:00")
    prompts.client.set_prompt_tag("assistant", MOVE_TAG + pending.id, json.dumps(pending.to_dict()))
    prompts.client.set_prompt_alias("assistant", PRODUCTION, 1)
    done = prompts.move(v1, key="run-1/promote", expected=None, kind="promotion", by="ada", dag_run="run-1",
                        reason="first")
    assert done.state == "done" and done.at and done.from_version is None
    assert [(m.id, m.state) for m in prompts.history("assistant")] == [(pending.id, "done")]


def test_a_version_altered_in_the_store_is_refused(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    prompts.move(v1, key="k", expected=None, kind="promotion", by="ada", dag_run="r", reason="first")
    prompts.client.set_prompt_version_tag("assistant", 1, DIGEST_TAG, "0" * 64)
    with pytest.raises(PromptError, match="does not match the digest"):
        prompts.by_alias("assistant")
    with pytest.raises(PromptError, match="does not match the digest"):
        prompts.get("assistant", 1)


def test_a_canary_has_a_share_and_ends_with_the_alias_first(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    v2, _ = prompts.register(TWO, "", "ada")
    prompts.move(v1, key="k", expected=None, kind="promotion", by="ada", dag_run="r", reason="first")
    assert prompts.rollout("assistant") is None
    prompts.start_rollout(v2, 0.25)
    version, share = prompts.rollout("assistant")
    assert version.version == 2 and share == 0.25
    assert [v.aliases for v in prompts.versions("assistant")] == [("production",), ("candidate",)]
    prompts.end_rollout(v2)
    assert prompts.rollout("assistant") is None
    with pytest.raises(ValueError, match="from 0 to 1"):
        prompts.start_rollout(v2, 1.5)


def test_a_version_nightshift_did_not_write_is_left_out_and_blocks_nothing(prompts):
    prompts.register(ONE, "", "ada")
    prompts.client.register_prompt("assistant", "Answer {{ q }}")  # someone else's text prompt, same name
    assert [v.version for v in prompts.versions("assistant")] == [1]
    v3, new = prompts.register(TWO, "", "ada")
    assert new and v3.version == 3
    with pytest.raises(PromptError):
        prompts.get("assistant", 2)


def test_a_retry_after_a_later_move_is_refused_instead_of_undoing_it(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    v2, _ = prompts.register(TWO, "", "ada")
    prompts.move(v1, key="first", expected=None, kind="promotion", by="ada", dag_run="r0", reason="first")
    # The promotion to v2 is killed after its alias write: its record stays pending.
    pending = PromptMove(move_id("run-2/promote"), PRODUCTION, "promotion", 1, 2, "bob", "run-2", "better",
                         "2026-12-06T10:00:00+00:00", digest=v2.digest)
    prompts.client.set_prompt_tag("assistant", MOVE_TAG + pending.id, json.dumps(pending.to_dict()))
    prompts.client.set_prompt_alias("assistant", PRODUCTION, 2)
    # An operator moves production back to v1 (a move of its own, recorded after the pending one).
    prompts.move(v1, key="rollback", expected=2, kind="rollback", by="ops", dag_run="r9", reason="v2 answers badly")
    with pytest.raises(PromptConflict, match="recorded after this one"):
        prompts.move(v2, key="run-2/promote", expected=1, kind="promotion", by="bob", dag_run="run-2", reason="x")
    assert prompts.by_alias("assistant").version == 1
    assert [m.state for m in prompts.history("assistant") if m.id == pending.id] == ["aborted"]


def test_a_released_version_rewritten_with_a_matching_digest_is_refused(prompts):
    v1, _ = prompts.register(ONE, "", "ada")
    prompts.move(v1, key="k", expected=None, kind="promotion", by="ada", dag_run="r", reason="first")
    assert prompts.verified(prompts.by_alias("assistant")).version == 1
    # Whoever writes version tags changes the variables' defaults and writes the digest to match.
    altered = PromptTemplate("assistant", ONE.system, ONE.examples, {"org": "evil corp"})
    prompts.client.set_prompt_version_tag("assistant", 1, VARIABLES_TAG, json.dumps(altered.variables))
    prompts.client.set_prompt_version_tag("assistant", 1, DIGEST_TAG, altered.digest())
    served = prompts.by_alias("assistant")  # consistent with itself...
    with pytest.raises(PromptError, match="altered in the store"):
        prompts.verified(served)  # ...but not with what was released
    v2, _ = prompts.register(TWO, "", "ada")
    prompts.client.set_prompt_alias("assistant", PRODUCTION, 2)  # set by hand, never released
    with pytest.raises(PromptError, match="never released by nightshift"):
        prompts.verified(prompts.by_alias("assistant"))


def test_an_error_from_a_proxy_is_not_read_as_no_prompt(prompts):
    from mlflow.exceptions import MlflowException

    class Proxy:
        def get_prompt_version_by_alias(self, name, alias):
            raise MlflowException("Not Found", error_code="ENDPOINT_NOT_FOUND")

    prompts._client = Proxy()
    with pytest.raises(MlflowException):
        prompts.by_alias("assistant")
