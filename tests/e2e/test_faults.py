"""Fault injection through real DAG runs: a step fails at the moment that matters, Airflow retries it, and the
end state equals an uninterrupted run's. Also what a person who may only trigger DAGs can try with Params.

Faults are named fault points (nightshift.faults) set to fail once; the task's retry meets no fault. The
kill-with-SIGKILL variants of the same points run against the steps directly in tests/versioning and
tests/registry.
"""

import json
import os
import shutil

import pytest

from cli_helpers import fresh, run
from helpers import SmtpSink, mlflow_store

pytestmark = pytest.mark.e2e


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    """A NIGHTSHIFT_HOME of its own for the data repo, registry and work folders (Airflow's DB is shared)."""
    from nightshift.settings import load_settings
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_FAULT_DIR", str(tmp_path))
    settings = load_settings()
    dataset_repository(settings).ensure()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return settings


def events_for(version):
    """Return the corpus asset events that announced this version (its tag and commit)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    from nightshift.airflow.common import CORPUS_ASSET

    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.uri == CORPUS_ASSET.uri).all())
        return [e.extra for e in events if (e.extra or {}).get("dataset_version") == version.tag
                and (e.extra or {}).get("rev") == version.rev]


def tries(dag_run, task_id):
    return dag_run.get_task_instance(task_id).try_number


# Each run meets two or three faults, each once: version_dataset resumes after the stage and then after the tag in
# successive tries (three in all, Airflow's retries=2); or preparation fails once, versioning once after its commit,
# and indexing once after its chunks were embedded and cached. Each retry starts from what the interrupted try left.
@pytest.mark.parametrize("points, expected_tries", [
    (("versioning.after_stage", "versioning.after_tag"), {"prepare_corpus": 1, "version_dataset": 3}),
    (("ingest.after_prepare", "versioning.after_commit", "retrieval.after_embed"),
     {"prepare_corpus": 2, "version_dataset": 2, "index_corpus": 2}),
], ids=["stage-then-tag", "prepare-then-commit-then-index"])
def test_ingest_survives_failed_steps_and_publishes_exactly_once(home, monkeypatch, points, expected_tries):
    from nightshift.stores import dataset_repository

    monkeypatch.setenv("NIGHTSHIFT_FAULT", ",".join(f"{point}:once" for point in points))
    dag_run, tasks = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    assert {task: tries(dag_run, task) for task in expected_tries} == expected_tries
    assert all((home.home.parent / f"fault-{point}").exists() for point in points)  # every fault was met
    repo = dataset_repository(home)
    version = repo.get("corpus-v0001")
    assert repo.versions() == ["corpus-v0001"] and repo.remote_has(version)
    assert len(events_for(version)) == 1 and tasks["publish_dataset"].state == "success"
    if "retrieval.after_embed" in points:  # the retry found every chunk in the cache the killed try filled
        index = tasks["index_corpus"].value
        assert index["embedded"] == 0 and index["cached"] > 0 and index["chunks"] >= index["cached"]
    skipped = json.loads(next(home.work_dir.glob("ingest_corpus/*/skipped.json")).read_text())
    # No duplicated records: the .csv the store cannot read, and the exact copy preparation drops.
    assert len(skipped) == len({json.dumps(s, sort_keys=True) for s in skipped}) == 2

    monkeypatch.delenv("NIGHTSHIFT_FAULT")
    again, tasks = run(fresh("ingest_corpus"), {})
    assert again.state == "success" and tasks["publish_dataset"].state == "skipped"
    assert repo.versions() == ["corpus-v0001"] and len(events_for(version)) == 1


@pytest.fixture
def trained_home(home, tiny_model):
    """The home above with a corpus version and the tiny model imported under its models folder."""
    shutil.copytree(tiny_model, home.models_dir / "tiny")
    dag_run, _ = run(fresh("ingest_corpus"), {})
    assert dag_run.state == "success"
    return home


def registry_state(settings):
    from nightshift.stores import registry_for

    registry = registry_for(settings)
    versions = registry.client.search_model_versions(f"name = '{registry.model_name}'")
    return registry, sorted(int(v.version) for v in versions)


BAD_RECIPES = {  # each validated before, then crashed inside every training rank on every retry
    "bad_numbers": ({"seed": "-1", "learning_rate": ".inf"},
                    "seed must be an integer from 0 to 4294967295", "learning_rate must be a finite number in (0, 1]"),
    "gpt2_lora": ({"method": "lora", "lora": "{target_modules: [c_attn, c_proj]}"},
                  "lora.target_modules ['c_attn', 'c_proj'] are not layers of the base model (llama)"),
}


def test_runs_that_fail_for_good_fail_once_or_after_retries_and_alert(trained_home, tmp_path, monkeypatch):
    """A recipe the base cannot train fails parse_request once, naming the field; a step that keeps failing is
    retried, then closes its MLflow run and alerts; a promotion whose champion changed since the evaluation fails
    once and alerts. One ingest serves the three parts."""
    from conftest import REPO

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    tiny = (REPO / "tests" / "e2e" / "recipes" / "tiny.yaml").read_text()
    for name, (changes, *_) in BAD_RECIPES.items():
        kept = [line for line in tiny.splitlines() if line.split(":", 1)[0] not in changes]
        (recipes / f"{name}.yaml").write_text("\n".join([*kept, *(f"{k}: {v}" for k, v in changes.items())]) + "\n")
    monkeypatch.setenv("NIGHTSHIFT_RECIPE_DIRS", f"{recipes}{os.pathsep}{os.environ['NIGHTSHIFT_RECIPE_DIRS']}")
    for name, (_, *messages) in BAD_RECIPES.items():
        dag_run, tasks = run(fresh("finetune_model"), {"base_model": "tiny", "recipe": name})
        assert dag_run.state == "failed" and tasks["parse_request"].state == "failed", name
        assert tries(dag_run, "parse_request") == 1, name  # no retry: it would fail the same way
        assert tasks["train_local"].state == "upstream_failed", name
        alerts = (trained_home.home / "alerts" / "alerts.jsonl").read_text().splitlines()
        assert all(m in json.loads(alerts[-1])["message"] for m in messages), (name, alerts[-1][:300])
    assert registry_state(trained_home)[1] == []

    # Unreadable data while evaluating is a ValueError, yet no bad request: it is retried like any failed call.
    monkeypatch.setenv("NIGHTSHIFT_FAULT", "finetune.evaluate:corrupt")
    dag_run, tasks = run(fresh("finetune_model"), {"base_model": "tiny", "recipe": "tiny"})
    assert dag_run.state == "failed" and tasks["evaluate"].state == "failed"
    assert tries(dag_run, "evaluate") == 3
    registry, versions = registry_state(trained_home)
    assert versions == [] and registry.champion() is None
    mlflow_run = registry.find_run("finetune_model", f"finetune_model/{dag_run.run_id}")
    assert mlflow_run.info.status == "FAILED"
    alerts = [json.loads(line) for line in (trained_home.home / "alerts" / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["title"].endswith("finetune_model.evaluate failed")

    # A champion that changed while the candidate was evaluated: v3 is gated against v2, an operator rolls back
    # to v1 before promote_candidate runs; the promotion fails once and alerts, the rollback stands.
    from nightshift.pipelines import finetune
    from nightshift.pipelines.rollback import RollbackRequest, move_champion, plan_rollback
    from nightshift.registry.history import PromotionHistory

    monkeypatch.delenv("NIGHTSHIFT_FAULT")
    for night in ("one", "two"):
        run_id = registry.open_run("finetune_model", night, night, {})
        registry.upload_checkpoint(run_id, trained_home.models_dir / "tiny")
        registry.promote(registry.register(run_id, tags={finetune.GATE_TAG: "passed",
                                                         finetune.EVALUATION_RUN_TAG: run_id}),
                         key=f"finetune_model/{night}/promote")
    real_gate = finetune.gate

    def gate_while_an_operator_rolls_back(*args, **kwargs):
        plan = plan_rollback(registry, RollbackRequest(1, "v2 answers wrong"))
        move_champion(registry, plan, "rollback_model/manual/move", "ada", "rollback_model/manual", "v2 answers wrong")
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(finetune, "gate", gate_while_an_operator_rolls_back)
    dag_run, tasks = run(fresh("finetune_model"), {"base_model": "tiny", "recipe": "tiny"})
    assert dag_run.state == "failed" and tasks["evaluate"].value["champion_before"]["version"] == 2
    assert tasks["decide_promotion"].value["passed"] and tasks["promote_candidate"].state == "failed"
    assert tries(dag_run, "promote_candidate") == 1
    assert registry.champion().version == 1
    assert [(m.from_version, m.to_version, m.kind) for m in PromotionHistory(registry).moves(include_pending=True)] \
        == [(None, 1, "promotion"), (1, 2, "promotion"), (2, 1, "rollback")]
    alert = json.loads((trained_home.home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["title"].endswith("finetune_model.promote_candidate failed")
    assert "is now v1, but this promotion to v3 was evaluated against v2" in alert["message"]


def test_a_second_run_of_a_dag_waits_for_the_first_to_finish(home):
    from datetime import UTC, datetime

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    fresh("ingest_corpus")
    with create_session() as session:  # a run of the scheduler's, still running, holds the lease
        session.add(DagRun(dag_id="ingest_corpus", run_id="scheduled__holder", run_type=DagRunType.SCHEDULED,
                           state=DagRunState.RUNNING, run_after=datetime.now(UTC), conf={}))
    (home.home / "locks").mkdir(parents=True)
    (home.home / "locks" / "ingest_corpus.json").write_text(json.dumps({"run_id": "scheduled__holder"}))

    blocked, tasks = run(fresh("ingest_corpus"), {})
    assert blocked.state == "failed" and tasks["plan_sources"].state == "failed"
    assert tries(blocked, "plan_sources") == 1  # refused at once, not retried
    alert = json.loads((home.home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert "scheduled__holder" in alert["message"] and "still running" in alert["message"]

    with create_session() as session:
        holder = session.query(DagRun).filter(DagRun.run_id == "scheduled__holder").one()
        holder.state = DagRunState.FAILED
    after, _ = run(fresh("ingest_corpus"), {})
    assert after.state == "success"


def test_params_cannot_reach_the_workers_files(home):
    dag_run, tasks = run(fresh("ingest_corpus"), {"source": "/etc"})
    assert dag_run.state == "failed" and tasks["plan_sources"].state == "failed"
    assert tries(dag_run, "plan_sources") == 1
    alert = json.loads((home.home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert "NIGHTSHIFT_SOURCE_ROOTS" in alert["message"] and "root:" not in json.dumps(alert)

    from airflow.sdk.definitions.param import ParamValidationError

    for recipe in ("/etc/passwd", "../../etc/passwd", "default.yaml"):
        with pytest.raises(ParamValidationError):
            fresh("finetune_model").test(run_conf={"recipe": recipe})
    dag_run, tasks = run(fresh("finetune_model"), {"base_model": "/etc"})  # refused before any data is read
    assert dag_run.state == "failed" and tasks["parse_request"].state == "failed"
    assert tries(dag_run, "parse_request") == 1
    assert tasks["resolve_dataset"].state == "upstream_failed"
    alert = json.loads((home.home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert "is not a model under" in alert["message"]


def test_a_planted_secret_in_a_failing_document_is_never_quoted(home, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / "ok.md").write_text("# Opening hours\\n\\nThe observatory opens at dusk, every night but Monday.")
    (store / "leak.txt").write_text("db_password=hunter2 " * 200)
    # A recipe that scrubs nothing: the quality suite's second PII pass must catch the password and fail.
    (tmp_path / "prep.yaml").write_text("limits: {min_chars: 10}\nsteps: []\n")
    monkeypatch.setenv("NIGHTSHIFT_PREP_RECIPE", str(tmp_path / "prep.yaml"))
    with SmtpSink() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_NIGHTSHIFT_ALERTS", smtp.connection())
        dag_run, tasks = run(fresh("ingest_corpus"), {"source": str(store)})
    assert dag_run.state == "failed" and tasks["validate_corpus"].state == "failed"
    body = SmtpSink.text(smtp.messages[-1])
    assert "leak.txt" in body and "hunter2" not in body
    quality = next(home.work_dir.glob("ingest_corpus/*/quality.json")).read_text()
    assert "leak.txt" in quality and "hunter2" not in quality and "pii_hits" in quality


def test_a_killed_rank_and_failures_at_every_registry_step_are_retried_to_one_promoted_version(
        trained_home, monkeypatch, tmp_path):
    """One night with everything going wrong once: rank 1 of two dies mid-run (SIGKILL), the upload fails before
    its manifest, registration fails, the move of the alias is lost. Every step retries to the state an
    uninterrupted night leaves: one version, promoted, its files verified, the training curve whole."""
    from nightshift.provenance import safe_name
    from nightshift.registry.common import PROMOTED_TAG
    from nightshift.registry.mlflow_registry import MANIFEST

    monkeypatch.setenv("NIGHTSHIFT_TRAIN_RANKS", "2")  # two ranks on one machine, so that one can die alone
    monkeypatch.setenv("NIGHTSHIFT_FAULT", "trainer.rank1.step6:kill-once,"  # the tiny recipe checkpoints at 4
                                           "registry.before_manifest:once,registry.before_register:once,"
                                           "registry.after_alias:once")
    dag_run, tasks = run(fresh("finetune_model"), {"base_model": "tiny", "recipe": "tiny"})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    assert tries(dag_run, "train_local") == 2 and tasks["verify_candidate"].state == "success"
    assert tries(dag_run, "register_candidate") == 3 and tries(dag_run, "promote_candidate") == 2
    folder = trained_home.work_dir / "finetune_model" / safe_name(dag_run.run_id)
    log = (folder / "trainer.log").read_text()
    assert "exitcode: -9" in log and "local_rank: 1" in log  # the first attempt: rank 1 died by SIGKILL
    assert "resuming from checkpoint step-00000004" in log  # the retry
    assert "on 2 ranks" in log

    registry, versions = registry_state(trained_home)
    assert versions == [1]
    champion = registry.champion()
    assert champion.version == 1
    assert registry.client.get_model_version(registry.model_name, "1").tags[PROMOTED_TAG]
    downloaded = registry.download(champion, tmp_path / "verify")  # checked file by file against the manifest
    assert (downloaded / MANIFEST).is_file() and (downloaded / "model.safetensors").is_file()
    assert registry.client.get_run(champion.run_id).info.status == "FINISHED"

    run_id = registry.find_run("finetune_model", f"finetune_model/{dag_run.run_id}").info.run_id
    assert run_id == champion.run_id
    history = registry.client.get_metric_history(run_id, "train_loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))  # streamed by rank 0 while training ran
    for key in ("learning_rate", "grad_norm", "tokens_per_s"):
        assert {m.step for m in registry.client.get_metric_history(run_id, key)} >= {7, 8}
    assert registry.client.get_run(run_id).data.metrics["reload_check_difference"] <= 1e-4
    assert not (folder / "checkpoints").exists()  # cleaned up with the run's other bulky outputs

    monkeypatch.delenv("NIGHTSHIFT_FAULT")
    again, tasks = run(fresh("finetune_model"), {"base_model": "tiny", "recipe": "tiny"})
    assert again.state == "success" and tasks["reuse_existing"].state == "success"
    assert registry_state(trained_home)[1] == [1]
