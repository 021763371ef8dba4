"""monitor_model end to end with dag.test(): a request log with a planted prompt drift, a champion users rate
down and errors; one incident per failing check, no repeat inside the interval, resolved when the hour is normal
again, and no logged text anywhere in what it writes."""

import json
import random
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from cli_helpers import fresh, run
from helpers import mlflow_store

pytestmark = pytest.mark.e2e

HOUR = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
PLANTED = "zebra7731"  # a word in every prompt and answer: it must appear in nothing monitor_model writes
USUAL = ["When does the {} museum open on Sundays?", "How much is a ticket for the {} planetarium?",
         "Is the {} observatory dome open at night?", "Where do I park near the {} science centre?"]
DRIFTED = ["Give me a recipe for {} sourdough bread with rye.", "How long should I roast a {} chicken?",
           "What wine goes with {} mushroom risotto?", "How do I make {} pasta dough without eggs?"]


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    settings.serving_dir.mkdir(parents=True, exist_ok=True)  # where the endpoint keeps its request log
    return settings


def champion_v2_after_v1(settings, tiny_model):
    from nightshift.pipelines.finetune import EVALUATION_RUN_TAG, GATE_TAG, promote_candidate
    from nightshift.stores import registry_for

    registry = registry_for(settings)
    versions = []
    for key in ("one", "two"):
        run_id = registry.open_run("finetune_model", key, key, {})
        registry.upload_checkpoint(run_id, tiny_model)
        versions.append(registry.register(run_id, tags={"nightshift.dataset_tag": f"corpus-{key}",
                                                        GATE_TAG: "passed", EVALUATION_RUN_TAG: run_id}))
    before = None
    for night, version in enumerate(versions, 1):
        promote_candidate(registry, version, f"finetune_model/night-{night}/promote", "schedule",
                          f"finetune_model/night-{night}", "gate passed", champion_before=before)
        before = version.to_dict()
        time.sleep(0.05)


def log_answers(settings, start, n, templates, version, errors=0, seed=0):
    from nightshift.serving.requestlog import LoggedAnswer, RequestLog

    rng = random.Random(seed)
    request_log = RequestLog(settings.request_log_url)
    request_log.open()
    request_log.start()
    ids = []
    for i in range(n):
        question = rng.choice(templates).format(f"{PLANTED} {rng.choice(['north', 'old', 'city', 'river'])}")
        rid = f"chatcmpl-{version}-{start:%H}-{seed}-{i}"
        ids.append(rid)
        request_log.record(LoggedAnswer(
            response_id=rid, key_id=f"k{i}", route="chat", model_name="nightshift-llm", model_version=version,
            model_role="champion", run_id=None, dataset_tag=None,
            request=[{"role": "user", "content": question}], answer=[f"Here is what I know about {PLANTED}."],
            finish="error" if i < errors else "stop", prompt_tokens=12, completion_tokens=9, seconds=0.4,
            created_at=start + timedelta(seconds=29 * i)))
    request_log.stop()
    return request_log, ids


def rate(request_log, ids, rating):
    for i, rid in enumerate(ids):
        request_log.add_feedback(rid, f"k{i}", rating, None, None)


def alerts(settings):
    """Return the alerts sent so far, their titles without the installation's ``[environment]`` prefix."""
    path = settings.home / "alerts" / "alerts.jsonl"
    sent = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [{**a, "title": re.sub(r"^\[[^\]]+\] ", "", a["title"])} for a in sent]


def ingest_runs():
    """The runs of ingest_corpus that monitor_model started (their ids say the hour)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "ingest_corpus", DagRun.run_id.like("retrain__%")).all()
        session.expunge_all()
    return runs


def test_one_incident_per_failing_check_no_repeat_then_resolved(home, tiny_model):
    champion_v2_after_v1(home, tiny_model)
    # The reference: two usual hours answered by v1, rated well.
    reference, v1_ids = log_answers(home, HOUR - timedelta(hours=3), 120, USUAL, 1, seed=1)
    rate(reference, v1_ids[:30], 1)
    # The hour judged: v2 answers drifted prompts, 10% end in an error, its raters are unhappy.
    hour, v2_ids = log_answers(home, HOUR - timedelta(hours=1), 120, DRIFTED, 2, errors=12, seed=2)
    rate(hour, v2_ids[:30], -1)

    dag_run, tasks = run(fresh("monitor_model"), {"hour_end": HOUR.isoformat()})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    summary = tasks["measure_hour"].value
    assert summary["answers"] == 120 and summary["versions"]["2"]["errors"] == 12
    assert summary["drift"]["drifted"] and summary["drift"]["auc"] > 0.9
    assert summary["feedback"]["worse"] and summary["feedback"]["champion"]["version"] == 2
    opened = alerts(home)
    assert sorted(a["title"].split(":")[0] for a in opened) == [
        "prompts drifted", "v2", "v2 is rated worse than v1 before it"]
    feedback_alert = next(a for a in opened if "rated worse" in a["title"])
    assert "rollback_model" in feedback_alert["message"] and "target_version 1" in feedback_alert["message"]
    # Drift and the ratings start a retrain: ingest_corpus at once, with the reason its corpus version carries.
    assert tasks["start_ingest"].state == "success"
    (retrain,) = ingest_runs()
    assert retrain.run_id == "retrain__20261201T1000" and retrain.run_type == "operator_triggered"
    assert "prompts drifted" in retrain.conf["reason"] and "rated worse" in retrain.conf["reason"]
    assert PLANTED not in retrain.conf["reason"]

    # The same hour judged again by another run: still failing, inside the repeat interval, nothing sent.
    dag_run, tasks = run(fresh("monitor_model"), {"hour_end": HOUR.isoformat()})
    assert dag_run.state == "success" and tasks["raise_incidents"].value == []
    assert len(alerts(home)) == 3
    assert tasks["decide_retrain"].state == "success" and tasks["start_ingest"].state == "skipped"  # rate limit
    assert len(ingest_runs()) == 1

    # The next hour is usual again and error-free: drift and errors resolve, the ratings still say v2 is worse.
    log_answers(home, HOUR, 120, USUAL, 2, seed=3)
    dag_run, tasks = run(fresh("monitor_model"), {"hour_end": (HOUR + timedelta(hours=1)).isoformat()})
    assert dag_run.state == "success"
    sent = tasks["raise_incidents"].value
    assert sorted(n["kind"] for n in sent) == ["resolved", "resolved"]
    # The drifted hour is no reference for the next: it would have kept the drift incident open for a week.
    drift = tasks["measure_hour"].value["drift"]
    assert drift["excluded_hours"] == [(HOUR - timedelta(hours=1)).isoformat()] and drift["auc"] < 0.62
    assert tasks["start_ingest"].state == "skipped" and len(ingest_runs()) == 1  # v2 still rated worse: too soon
    resolved = alerts(home)[3:]
    assert all(a["title"].startswith("resolved: ") and a["severity"] == "info" for a in resolved)

    from nightshift.alerts.incidents import IncidentBook

    book = IncidentBook(home.incidents_url, timedelta(hours=24))
    assert [(i["check_name"], i["subject"]) for i in book.open_incidents()] == [("live_feedback", "v2")]

    page = (home.reports_dir / "monitoring.html").read_text()
    assert "live_feedback" in page and "v2 is rated worse than v1" in page and "traffic.svg" in page
    assert all((home.reports_dir / "monitoring" / f"{c}.svg").is_file()
               for c in ("traffic", "p95", "p50", "errors", "feedback", "drift"))
    assert all(a["report_url"].endswith("/monitoring.html") for a in alerts(home))

    # What monitor_model wrote holds no logged text: metrics, profiles, summaries, alerts, incidents, the page.
    written = [p for p in (home.home / "monitoring").rglob("*") if p.is_file()]
    written += [home.home / "alerts" / "alerts.jsonl", home.home / "alerts" / "incidents.db"]
    written += [p for p in home.reports_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".whylogs") for p in written)
    for path in written:
        assert PLANTED.encode() not in path.read_bytes(), path


class _Clock:
    offset = timedelta(0)


class _ShiftedDatetime(datetime):
    """``datetime`` whose now() runs ``_Clock.offset`` ahead: the endpoint lives through a simulated day."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + _Clock.offset


def test_a_simulated_day_against_a_live_endpoint_opens_one_drift_and_one_feedback_incident_then_resolves(
        home, tiny_model, tmp_path, monkeypatch):
    """A day of traffic replayed through the endpoint on 127.0.0.1 with the official openai client and its feedback
    route (bounded: 30 requests an hour), the endpoint's clock moved hour by hour: three usual hours on v1, rated
    well; v2 promoted, rated down; then prompts about something else. monitor_model opens exactly one drift and one
    feedback incident, repeats nothing the next hour, and resolves both once v1 serves usual traffic again."""
    import httpx
    from openai import OpenAI

    from helpers import UvicornThread, ready, wait_for
    from nightshift.pipelines.finetune import EVALUATION_RUN_TAG, GATE_TAG, promote_candidate
    from nightshift.pipelines.rollback import RollbackRequest, move_champion, plan_rollback
    from nightshift.serving.app import create_app
    from nightshift.serving.keys import KeyRing, KeyStore
    from nightshift.serving.requestlog import RequestLog
    from nightshift.settings import CONFIG_DIR
    from nightshift.stores import dataset_repository, registry_for

    policy = (CONFIG_DIR / "monitoring.yaml").read_text()
    for old, new in (("min_answers: 30 ", "min_answers: 20 "), ("sample: 500 ", "sample: 90 "),
                     ("min_prompts: 100 ", "min_prompts: 25 "), ("min_ratings: 20 ", "min_ratings: 15 ")):
        assert old in policy
        policy = policy.replace(old, new)
    (tmp_path / "monitoring.yaml").write_text(policy)
    monkeypatch.setenv("NIGHTSHIFT_MONITORING_POLICY", str(tmp_path / "monitoring.yaml"))
    monkeypatch.setattr("nightshift.serving.requestlog.datetime", _ShiftedDatetime)
    monkeypatch.setattr("nightshift.serving.routes.datetime", _ShiftedDatetime)

    # What the champions were trained on: visitor questions (prompts are compared with it, nearest document).
    repo = dataset_repository(home)
    repo.ensure()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t.format(place) + " It opens at ten."}) + "\n"
                              for i, (t, place) in enumerate((t, p) for t in USUAL for p in ("north", "old"))))
    tag = repo.commit(corpus, {"documents": 8}).tag
    registry = registry_for(home)
    versions = []
    for key in ("one", "two"):
        run_id = registry.open_run("finetune_model", key, key, {})
        registry.upload_checkpoint(run_id, tiny_model)
        versions.append(registry.register(run_id, tags={"nightshift.dataset_tag": tag,
                                                        GATE_TAG: "passed", EVALUATION_RUN_TAG: run_id}))
    promote_candidate(registry, versions[0], "finetune_model/night-1/promote", "schedule", "finetune_model/night-1",
                      "gate passed", champion_before=None)
    keys = [KeyStore(home.key_file).create(f"user-{i}")[1] for i in range(30)]  # votes count once per key
    app = create_app(registry, home.cache_dir / "serving-replay", keyring=KeyRing(KeyStore(home.key_file)),
                     poll_seconds=0.3, request_log=RequestLog(home.request_log_url))
    day = HOUR - timedelta(hours=6)
    sent: list[tuple[int, str]] = []
    pings = []

    def judge(end: datetime):
        dag_run, tasks = run(fresh("monitor_model"), {"hour_end": end.isoformat()})
        assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
        return tasks

    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion to load")
        clients = [OpenAI(base_url=f"{server.url}/v1", api_key=k, max_retries=0, timeout=60) for k in keys]
        raters = [httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {k}"}, timeout=60)
                  for k in keys]

        def serves(version: int) -> bool:
            answer = clients[0].chat.completions.create(model="nightshift-llm", max_tokens=1,
                                                        messages=[{"role": "user", "content": "ping"}])
            pings.append(answer.id)
            return answer.system_fingerprint == f"v{version}"

        def hour(index: int, templates: list[str], version: int, rating: int) -> datetime:
            """One hour of traffic: 30 users ask, 20 of them rate their answer; returns the hour's end."""
            rng = random.Random(index)
            start = day + timedelta(hours=index)
            _Clock.offset = start + timedelta(minutes=5) - datetime.now(UTC)
            for user in range(30):
                question = rng.choice(templates).format(f"{PLANTED} {rng.choice(['north', 'old', 'city', 'river'])}")
                answer = clients[user].chat.completions.create(model="nightshift-llm", max_tokens=4, temperature=0,
                                                               messages=[{"role": "user", "content": question}])
                assert answer.system_fingerprint == f"v{version}"
                sent.append((version, answer.id))
                if user < 20:
                    raters[user].post("/v1/feedback", json={"response_id": answer.id, "rating": rating}) \
                        .raise_for_status()
            _Clock.offset = timedelta(0)
            return start + timedelta(hours=1)

        for index in range(3):  # the reference: v1 answers the usual questions, rated well
            hour(index, USUAL, 1, 1)
        promote_candidate(registry, versions[1], "finetune_model/night-2/promote", "schedule",
                          "finetune_model/night-2", "gate passed", champion_before=versions[0].to_dict())
        wait_for(lambda: serves(2), what="v2 to serve")
        hour(3, USUAL, 2, -1)  # a bad champion: users rate it down

        # The second half of the day: users ask about cooking. monitor_model judges each hour as it ends.
        tasks = judge(hour(4, DRIFTED, 2, -1))
        assert tasks["measure_hour"].value["versions"]["2"]["answers"] == 30, tasks["measure_hour"].value
        assert sum(tasks["measure_hour"].value["versions"]["2"]["finishes"].values()) == 30
        opened = alerts(home)
        assert sorted(a["title"].split(":")[0] for a in opened) == ["prompts drifted",
                                                                    "v2 is rated worse than v1 before it"]
        assert not any(c["failing"] for c in tasks["judge_hour"].value if c["check"] == "error_rate")
        near = tasks["measure_hour"].value["drift"]["corpus_similarity"]  # cooking is far from the training data
        assert near["dataset"] == tag and near["documents"] == 8 and near["current"] < near["reference"] - 0.2, near
        tasks = judge(hour(5, DRIFTED, 2, -1))  # still drifted, still rated down: nothing repeated inside a day
        assert tasks["raise_incidents"].value == [] and len(alerts(home)) == 2

        # The way back the feedback alert gives: v1 serves again, and users ask the usual questions.
        move_champion(registry, plan_rollback(registry, RollbackRequest(1, "v2 is rated down")),
                      "rollback_model/replay/move", "ada", "rollback_model/replay", "v2 is rated down")
        wait_for(lambda: serves(1), what="v1 to serve again")
        tasks = judge(hour(6, USUAL, 1, 1))
        assert sorted((n["kind"], n["title"].split(":")[1].strip()) for n in tasks["raise_incidents"].value) == [
            ("resolved", "prompts drifted"), ("resolved", "v2 is rated worse than v1 before it")]
        assert len(alerts(home)) == 4
    logged = {a["response_id"] for a in RequestLog(home.request_log_url).answers_between(
        day, HOUR + timedelta(hours=1), 10_000)}
    assert logged == {rid for _, rid in sent} and len(sent) == 210  # every answer, in its simulated hour
    for path in [home.home / "alerts" / "alerts.jsonl", *(home.home / "monitoring").rglob("*.json*")]:
        assert PLANTED.encode() not in path.read_bytes(), path
