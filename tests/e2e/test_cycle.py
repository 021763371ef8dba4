"""Real DAG runs with dag.test(): Airflow, GX, DVC, DeepSpeed (2 CPU ranks), MLflow and the endpoint.

The tests share one NIGHTSHIFT_HOME of their own and run in order: a corpus that fails its checks, a full cycle,
a clearly worse candidate, and a rerun on unchanged documents.
"""

import json
import re
import shutil

import pytest

from cli_helpers import Approver, fresh, run
from helpers import SmtpSink, UvicornThread, mlflow_store, own_home, ready, wait_for
from nightshift.provenance import safe_name
from nightshift.settings import CONFIG_DIR, SAMPLE_STORE

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def home(airflow_db, tmp_path_factory):
    """The module's own NIGHTSHIFT_HOME (the session's metadata DB is shared; its asset events are filtered)."""
    yield from own_home(tmp_path_factory, "cycle-home")


@pytest.fixture(scope="module")
def dags(home):
    """DAGs by id, each parsed anew for every run (cli_helpers.fresh)."""
    from nightshift.stores import dataset_repository

    dataset_repository(home).ensure()  # as `make setup` does
    mlflow_store(home.mlflow_dir / "mlflow.db")
    global _FIRST_EVENT
    _FIRST_EVENT = _last_event_id() + 1  # the session's metadata DB may hold other modules' events

    class FreshDags:
        def __getitem__(self, dag_id: str):
            return fresh(dag_id)

    return FreshDags()


@pytest.fixture(scope="module")
def repo(home):
    from nightshift.stores import dataset_repository

    return dataset_repository(home)


@pytest.fixture(scope="module")
def registry(home):
    from nightshift.stores import registry_for

    return registry_for(home)


@pytest.fixture(scope="module")
def finetune_conf(home, tiny_model):
    base = shutil.copytree(tiny_model, home.models_dir / tiny_model.name)  # bases live under the home's models
    return {"base_model": str(base), "recipe": "tiny"}


def test_corpus_that_fails_the_suite_fails_the_run_creates_no_version_and_alerts(dags, repo, home, tmp_path,
                                                                                 monkeypatch):
    store = tmp_path / "bad-store"
    store.mkdir()
    park = ("Where do I park when I visit the observatory in the evening? Cars are left in the lower car park, and "
            "the path to the dome takes about ten minutes on foot from there, with red lights along the way.")
    hours = ("When does the public gallery open for visitors in the winter months? The gallery opens at seven in the "
             "evening and closes at half past ten, and the last entry is one hour before the doors close.")
    (store / "faq.jsonl").write_text(json.dumps({"id": "q1", "text": park}) + "\n"
                                     + json.dumps({"id": "q1", "text": hours}) + "\n")
    # 250,000 characters: over prep.yaml's per-document max_chars, so preparation drops it and counts it
    (store / "dump.txt").write_text("The dome is open tonight. " * 10_000)
    with SmtpSink() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_NIGHTSHIFT_ALERTS", smtp.connection())
        dag_run, tasks = run(dags["ingest_corpus"], {"source": str(store)})

    assert dag_run.state == "failed"
    assert tasks["merge_sources"].state == "success"
    assert tasks["validate_corpus"].state == "failed"
    assert tasks["version_dataset"].state == "upstream_failed"
    assert repo.versions() == []
    (mail,) = smtp.messages
    assert mail["To"] == "data-oncall@example.com"
    # "[local]": the nightshift_environment Variable that airflow_settings.yaml put in the metadata DB
    assert "[local] ingest_corpus.validate_corpus failed" in mail["Subject"]
    body = SmtpSink.text(mail)
    assert "expect_column_values_to_be_unique" in body  # two documents with one id: an aggregate check
    # The alert links to the run's page, which holds the Data Docs of the failed validation.
    page = home.reports_dir / "runs" / "ingest_corpus" / safe_name(dag_run.run_id) / "index.html"
    assert f"report: {home.report_url(f'runs/ingest_corpus/{safe_name(dag_run.run_id)}/index.html')}" in body
    docs = [p.read_text() for p in page.parent.glob("datadocs/validations/documents/**/*.html")]
    assert page.is_file() and docs and re.search(r"id=[^<\s]*q1", docs[0]) and "Where do I park" not in docs[0]
    assert tasks["prepare_corpus"].value["dropped"] == {"limits": 1}  # the dump: a per-document limit


def test_full_cycle_versions_trains_registers_promotes_and_serves(dags, repo, registry, home, finetune_conf,
                                                                 tmp_path, monkeypatch):
    from openai import OpenAI

    from nightshift.cli.serving import serving_retrieval
    from nightshift.registry.rollout_state import Rollouts
    from nightshift.serving.app import create_app
    from nightshift.serving.keys import KeyRing, KeyStore

    # Started with a reason (as monitor_model starts a retrain): the corpus version's event carries it.
    ingest, tasks = run(dags["ingest_corpus"], {"reason": "prompts drifted (ROC AUC 0.91)"})
    assert ingest.state == "success", {t: ti.state for t, ti in tasks.items()}
    version = tasks["version_dataset"].value
    assert version["created"] and version["tag"] == "corpus-v0001" == repo.versions()[-1]
    assert repo.remote_has(repo.get(version["tag"]))
    assert _asset_events() == [version["tag"]]
    assert _asset_events(field="reason") == ["prompts drifted (ROC AUC 0.91)"]
    # The version's vector index: every chunk embedded on the first night, announced with the version.
    index = tasks["index_corpus"].value
    assert index["tag"] == "corpus-v0001" and index["engine"] == "files" and index["documents"] == version["documents"]
    assert index["chunks"] == index["embedded"] > version["documents"] and index["cached"] == 0
    assert _asset_events(field="index") == [{"chunks": index["chunks"], "engine": "files"}]

    # A canary policy on a fresh installation: there is no champion to compare with on live traffic, so the
    # first version is promoted directly rather than left as a candidate that no rollout can ever finish.
    (tmp_path / "rollout.yaml").write_text("mode: canary\nsteps: [0.1, 0.5]\n")
    monkeypatch.setenv("NIGHTSHIFT_ROLLOUT_POLICY", str(tmp_path / "rollout.yaml"))
    # A person approves the release (gate.yaml: approval required) through the REST API, as the UI does.
    (tmp_path / "gate.yaml").write_text((CONFIG_DIR / "gate.yaml").read_text().replace("approval: none",
                                                                                        "approval: required"))
    monkeypatch.setenv("NIGHTSHIFT_GATE_POLICY", str(tmp_path / "gate.yaml"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")  # the REST client's token
    with Approver("finetune_model", "Approve") as person:
        finetune, tasks = run(dags["finetune_model"], {**finetune_conf, "dataset_version": version["tag"]})
    monkeypatch.delenv("NIGHTSHIFT_ROLLOUT_POLICY")
    monkeypatch.delenv("NIGHTSHIFT_GATE_POLICY")
    states = {t: ti.state for t, ti in tasks.items()}
    assert finetune.state == "success", states
    assert person.error is None and states["approve_release"] == "success" and states["decline_release"] == "skipped"
    form = person.answered  # what passed and by how much, what changed, where the report is
    assert form["subject"] == "Release nightshift-llm v1 (trained on corpus-v0001)?"
    assert "| golden.token_f1 |" in form["body"] and "golden answers changed" in form["body"]
    assert home.report_url(f"runs/finetune_model/{safe_name(finetune.run_id)}/index.html") in form["body"]
    assert form["options"] == ["Approve", "Reject"] and form["defaults"] == ["Reject"]
    assert states["train_local"] == "success" and states["train_kubernetes"] == "skipped"
    # Whether retrieval, fine-tuning or both help: four ways of answering the golden items that name their sources.
    rag = tasks["compare_retrieval"].value
    assert states["compare_retrieval"] == "success" and rag["index"] == "corpus-v0001" and rag["items"] == 8
    assert [v["name"] for v in rag["variants"]] == ["base", "fine-tuned", "base+RAG", "fine-tuned+RAG"]
    assert rag["best"] in {v["name"] for v in rag["variants"]} and 0.5 <= rag["recall_at_k"] <= 1.0
    low, high = rag["variants"][3]["vs_finetuned"]["low"], rag["variants"][3]["vs_finetuned"]["high"]
    assert low <= rag["variants"][3]["vs_finetuned"]["difference"] <= high
    assert states["promote_candidate"] == "success" and states["reject_candidate"] == "skipped"
    assert states["start_rollout"] == "skipped" and Rollouts(registry).current() is None
    assert not registry.client.get_registered_model(registry.model_name).aliases.get("candidate")

    champion = registry.champion()
    assert champion.version == 1 and champion.dataset_tag == "corpus-v0001"
    mlflow_run = registry.client.get_run(champion.run_id)
    params = mlflow_run.data.params
    assert params["dataset.tag"] == "corpus-v0001" and params["dataset.md5"] == version["md5"]
    assert params["dataset.rev"] == version["rev"] and params["code_revision"]
    assert params["recipe.learning_rate"] == "0.002" and params["base_model"] == finetune_conf["base_model"]
    metrics = mlflow_run.data.metrics
    assert metrics["candidate.heldout.perplexity"] < metrics["champion.heldout.perplexity"]
    assert metrics["diff.heldout.perplexity.low"] <= metrics["diff.heldout.perplexity"] \
        <= metrics["diff.heldout.perplexity.high"] < 0.02
    assert {"candidate.golden.token_f1", "diff.golden.token_f1.low", "champion.golden.refusal_rate"} <= set(metrics)
    assert mlflow_run.data.tags["nightshift.gate"] == "passed"
    # The evaluation report is in the run and the version points at it; the promotion is in the history.
    artifacts = {a.path for a in registry.client.list_artifacts(champion.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/evaluation.json"} <= artifacts
    tags = registry.version_tags(champion.version)
    assert tags["nightshift.evaluation_report"] == f"runs:/{champion.run_id}/evaluation/report.html"
    from nightshift.registry.history import PromotionHistory

    (move,) = PromotionHistory(registry).moves()
    assert (move.from_version, move.to_version, move.kind) == (None, 1, "promotion")
    assert move.dag_run == f"finetune_model/{finetune.run_id}" and "heldout.perplexity" in move.evaluation["gate"]
    assert mlflow_run.info.status == "FINISHED"

    report = tasks["report"].value
    assert report["promoted"]["version"] == 1 and report["decision"]["passed"]
    # The promotion tells ingest_corpus which data the champion saw (its drift reference).
    assert _asset_events("nightshift://models/champion") == ["corpus-v0001"]
    # The run's page: loss curve, candidate against the base model, the gate; the overview marks the champion.
    folder = home.reports_dir / "runs" / "finetune_model" / safe_name(finetune.run_id)
    page = (folder / "index.html").read_text()
    assert (folder / "loss.svg").is_file() and (folder / "evaluation.svg").is_file()
    assert "golden.token_f1" in (folder / "evaluation.html").read_text() and "evaluation.html" in page
    assert "loss.svg" in page and "golden-answer perplexity" in page and "passed" in page
    assert "Retrieval and fine-tuning" in page and "fine-tuned+RAG" in page
    overview = (home.reports_dir / "index.html").read_text()
    assert "v1" in overview and "champion" in overview and "corpus-v0001" in overview

    store = KeyStore(home.key_file)
    _record, key = store.create("e2e")
    app = create_app(registry, home.cache_dir / "serving-test", keyring=KeyRing(store), poll_seconds=0.5,
                     retrieval=serving_retrieval(home))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion to load")
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key)
        answer = client.chat.completions.create(
            model="nightshift-llm", messages=[{"role": "user", "content": "When is the observatory open?"}],
            max_tokens=8, temperature=0,
        )
        # The answer to this question is in one sample document only: the champion's index cites it first.
        grounded = client.chat.completions.create(
            model="nightshift-llm+rag", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "At what wind speed do the domes stay closed?"}])
    assert answer.system_fingerprint == "v1"
    assert answer.choices[0].message.content is not None
    assert grounded.model_extra["citations"][0]["document"] == "samples/notes/weather.txt"


def test_clearly_worse_candidate_is_not_promoted_and_alerts(dags, registry, home, finetune_conf):
    finetune, tasks = run(dags["finetune_model"], {**finetune_conf, "learning_rate": 0.5})
    states = {t: ti.state for t, ti in tasks.items()}
    assert finetune.state == "success", states
    assert states["reject_candidate"] == "success"
    assert states["register_candidate"] == "skipped" and states["promote_candidate"] == "skipped"
    decision = tasks["decide_promotion"].value
    assert not decision["passed"] and decision["baseline"] == "champion nightshift-llm v1"
    assert registry.champion().version == 1
    assert [int(v.version) for v in registry.client.search_model_versions(f"name = '{registry.model_name}'")] == [1]
    alerts = [json.loads(line) for line in (home.home / "alerts" / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["severity"] == "warning" and "not promoted" in alerts[-1]["title"]
    assert "perplexity" in alerts[-1]["message"]


def test_rerun_on_unchanged_store_creates_no_version_and_no_duplicate_model(
    dags, repo, registry, home, finetune_conf, tmp_path, monkeypatch
):
    ingest, tasks = run(dags["ingest_corpus"], {})
    assert ingest.state == "success"
    assert tasks["version_dataset"].value["created"] is False
    assert tasks["publish_dataset"].state == "skipped"  # no asset event, so no training is scheduled

    moved = shutil.copytree(SAMPLE_STORE, tmp_path / "mounted-elsewhere")  # same documents, other location
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: samples\n    kind: files\n    path: {moved.as_uri()}\n")
    monkeypatch.setenv("NIGHTSHIFT_SOURCES_FILE", str(sources))
    ingest, tasks = run(dags["ingest_corpus"], {})
    assert ingest.state == "success" and tasks["version_dataset"].value["tag"] == "corpus-v0001"
    assert repo.versions() == ["corpus-v0001"]
    assert _asset_events() == ["corpus-v0001"]

    finetune, tasks = run(dags["finetune_model"], {**finetune_conf, "dataset_version": "corpus-v0001"})
    assert finetune.state == "success"
    assert tasks["reuse_existing"].state == "success" and tasks["prepare_data"].state == "skipped"
    assert [int(v.version) for v in registry.client.search_model_versions(f"name = '{registry.model_name}'")] == [1]
    # The reusing run's page says what happened rather than "(yet)", and version 1 keeps its own verdict in the
    # nightshift page's model table (a reuse once overwrote it with "reused").
    page = (home.reports_dir / "runs" / "finetune_model" / safe_name(finetune.run_id) / "index.html").read_text()
    assert "(yet)" not in page and "Not evaluated again: version 1" in page
    overview = (home.reports_dir / "index.html").read_text()
    assert 'badge reused' not in overview and '<span class="badge passed">passed</span>' in overview

    # The next night one document changed: a new version, whose index embeds only that document's changed chunks.
    weather = moved / "notes" / "weather.txt"
    weather.write_text(weather.read_text() + "\nFog over the valley stops observing too: the domes stay shut.\n")
    ingest, tasks = run(dags["ingest_corpus"], {})
    assert ingest.state == "success" and tasks["version_dataset"].value["tag"] == "corpus-v0002"
    index = tasks["index_corpus"].value
    from nightshift.embeddings import embedder
    from nightshift.retrieval.config import RetrievalConfig
    from nightshift.retrieval.store import open_store

    store = open_store(None, home.home, RetrievalConfig.load(home.retrieval_config))
    before = store.chunk_hashes("corpus-v0001", embedder().key)
    after = store.chunk_hashes("corpus-v0002", embedder().key)
    new = {chunk for chunk, digest in after.items() if digest not in set(before.values())}
    assert 0 < index["embedded"] == len(new) < index["chunks"] / 4
    assert index["embedded"] + index["cached"] == len(set(after.values()))
    assert all(chunk.startswith("samples/notes/weather.txt#") for chunk in new)


_FIRST_EVENT = 0


def _last_event_id() -> int:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import func

    with create_session() as session:
        return session.query(func.max(AssetEvent.id)).scalar() or 0


def _asset_events(uri: str = "nightshift://datasets/corpus", field: str = "dataset_version") -> list[str]:
    """The dataset versions (or another field of the events) announced on ``uri`` by this module's runs."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.uri == uri, AssetEvent.id >= _FIRST_EVENT).order_by(AssetEvent.id).all())
        return [e.extra.get(field) for e in events]
