"""rollout_model with dag.test() against a real endpoint under live traffic: a canary that holds up is promoted
step by step; one that users rate down is rolled back, and the champion answers everything again."""

import random
import threading
from collections import Counter

import httpx
import pytest

from cli_helpers import fresh, run
from helpers import UvicornThread, mlflow_store, perturbed_copy, ready, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
mode: canary
steps: [0.3, 0.6]
step_minutes: 0.03
min_answers: 6
max_step_minutes: 3
max_error_rate_increase: 0.05
max_latency_p95_ratio: 50
max_negative_feedback_increase: 0.10
min_ratings: 3
"""


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    policy = tmp_path / "rollout.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("NIGHTSHIFT_ROLLOUT_POLICY", str(policy))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return settings


def register(registry, folder, key):
    from nightshift.pipelines.finetune import GATE_TAG

    run_id = registry.open_run("finetune_model", key, key, {})
    registry.upload_checkpoint(run_id, folder)
    return registry.register(run_id, tags={"nightshift.dataset_tag": f"corpus-{key}", GATE_TAG: "passed"})


class Traffic:
    """Users asking questions while the rollout runs; ``rate_candidate`` is what they think of the candidate."""

    def __init__(self, url: str, rate_candidate: int | None) -> None:
        self.url = url
        self.rate_candidate = rate_candidate
        self.stop = threading.Event()
        self.seen: Counter = Counter()
        self.threads = [threading.Thread(target=self.user, args=(i,), daemon=True) for i in range(3)]

    def user(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                r = client.post("/v1/completions", json={"model": "nightshift-llm", "prompt": "The harbour opens at",
                                                         "max_tokens": 4, "user": f"user-{rng.randrange(10**6)}"})
                assert r.status_code == 200, r.text
                role = r.headers["x-nightshift-model-role"]
                self.seen[role] += 1
                rating = self.rate_candidate if role == "candidate" else 1
                if rating is not None:
                    client.post("/v1/feedback", json={"response_id": r.json()["id"], "rating": rating})

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture
def endpoint(home, tiny_model, tmp_path):
    from nightshift.serving.app import create_app
    from nightshift.serving.requestlog import RequestLog
    from nightshift.stores import registry_for

    registry = registry_for(home)
    v1 = register(registry, tiny_model, "one")
    registry.promote(v1)
    v2 = register(registry, perturbed_copy(tiny_model, tmp_path / "v2"), "two")
    home.serving_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(registry, tmp_path / "cache", require_key=False, poll_seconds=0.2,
                     request_log=RequestLog(home.request_log_url))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion")
        yield server, registry, v1, v2


def test_a_canary_that_holds_up_is_promoted_step_by_step(endpoint):
    from nightshift.registry.history import PromotionHistory

    server, registry, v1, v2 = endpoint
    with Traffic(server.url, rate_candidate=1) as traffic:
        dag_run, tasks = run(fresh("rollout_model"), {"candidate_version": v2.version})
    assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
    assert [tasks[f"step_{i}_observe"].value["passed"] for i in (1, 2)] == [True, True]
    assert tasks["step_1_share"].value["share"] == 0.3 and tasks["step_2_share"].value["share"] == 0.6
    assert traffic.seen["candidate"] > 0 and traffic.seen["champion"] > 0
    assert registry.champion().version == v2.version
    move = PromotionHistory(registry).moves()[-1]
    assert (move.kind, move.from_version, move.to_version) == ("rollout", v1.version, v2.version)
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["version"] == v2.version, what="v2 as champion")
    assert httpx.get(f"{server.url}/healthz").json()["rollout"] is None


def test_a_canary_users_rate_down_is_rolled_back_and_the_champion_takes_all_traffic(endpoint):
    server, registry, v1, v2 = endpoint
    with Traffic(server.url, rate_candidate=-1):
        dag_run, tasks = run(fresh("rollout_model"), {"candidate_version": v2.version, "mode": "canary"})
    assert dag_run.state == "failed"
    assert tasks["step_1_observe"].state == "failed" and tasks["step_2_share"].state == "upstream_failed"
    assert tasks["finish_rollout"].state == "failed"  # it rolled back, and says so by failing the run
    assert registry.champion().version == v1.version
    assert registry.version_tags(v2.version)["nightshift.rollout.state"] == "rolled_back"
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["rollout"] is None, what="the candidate to go")
    roles = Counter()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(60):
            r = client.post("/v1/completions", json={"model": "nightshift-llm", "prompt": "Hi", "max_tokens": 2,
                                                     "user": f"u{i}"})
            roles[r.headers["x-nightshift-model-version"]] += 1
    assert roles == {str(v1.version): 60}


def test_finetune_model_hands_a_gated_candidate_to_rollout_model_under_a_rollout_policy(home, tiny_model):
    from nightshift.airflow.common import CANDIDATE_ASSET
    from nightshift.evaluation.rollout_policy import RolloutPolicy
    from nightshift.pipelines.rollout import RolloutRefused, start_rollout
    from nightshift.registry.rollout_state import Rollouts
    from nightshift.stores import registry_for

    finetune, rollout = fresh("finetune_model"), fresh("rollout_model")
    assert finetune.task_dict["release"].downstream_task_ids == {"promote_candidate", "start_rollout",
                                                                 "decline_release"}
    assert [o.uri for o in finetune.task_dict["start_rollout"].outlets] == [CANDIDATE_ASSET.uri]
    assert [a.uri for a in rollout.timetable.asset_condition.objects] == [CANDIDATE_ASSET.uri]

    registry = registry_for(home)
    registry.promote(register(registry, tiny_model, "one"))
    v2 = register(registry, tiny_model, "two")
    policy = RolloutPolicy.load(home.rollout_policy)
    assert start_rollout(registry, v2, policy)["share"] == 0.3  # the first step
    assert Rollouts(registry).current().version.version == v2.version
    assert start_rollout(registry, v2, policy, "shadow")["mode"] == "shadow"
    assert Rollouts(registry).current().mode == "shadow" and Rollouts(registry).current().share == 0
    with pytest.raises(RolloutRefused, match="canary or shadow"):
        start_rollout(registry, v2, RolloutPolicy(mode="off"))


class PromptTraffic(Traffic):
    """Users chatting while a prompt's canary runs; ``rate_candidate`` is what they think of its answers."""

    def user(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                r = client.post("/v1/chat/completions", json={
                    "model": "nightshift-llm", "max_tokens": 3, "user": f"user-{rng.randrange(10**6)}",
                    "messages": [{"role": "user", "content": "When does the harbour open?"}]})
                assert r.status_code == 200, r.text
                role = r.headers["x-nightshift-prompt-role"]
                self.seen[role] += 1
                rating = self.rate_candidate if role == "candidate" else 1
                client.post("/v1/feedback", json={"response_id": r.json()["id"], "rating": rating})


@pytest.mark.parametrize("rating", [1, -1])
def test_a_prompt_canary_runs_the_same_steps_on_the_champions_answers(home, tiny_model, tmp_path, rating):
    from nightshift.pipelines.rollout import RolloutRefused, plan_prompt_rollout
    from nightshift.prompts.template import PromptTemplate
    from nightshift.serving.app import create_app
    from nightshift.serving.prompting import PromptWatcher
    from nightshift.serving.requestlog import RequestLog
    from nightshift.stores import prompt_registry_for, registry_for

    registry = registry_for(home)
    registry.promote(register(registry, tiny_model, "one"))
    prompts = prompt_registry_for(home)
    v1, _ = prompts.register(PromptTemplate("assistant", "You answer for the harbour."), "", "ada")
    v2, _ = prompts.register(PromptTemplate("assistant", "You answer briefly for the harbour."), "", "ada")
    prompts.move(v1, key="first", expected=None, kind="promotion", by="ada", dag_run="r", reason="first")
    from nightshift.evaluation.rollout_policy import RolloutPolicy

    with pytest.raises(RolloutRefused, match="no standing pass of evaluate_prompt's gate"):
        plan_prompt_rollout(prompts, "assistant", v2.version, None, RolloutPolicy.load(home.rollout_policy))
    prompts.note(v2, "canary", key="gated", by="ada", dag_run="evaluate_prompt/x", reason="passed the gate")
    home.serving_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(registry, tmp_path / "cache", require_key=False, poll_seconds=0.2,
                     request_log=RequestLog(home.request_log_url), prompts=PromptWatcher(prompts, "assistant", 0.2))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion")
        with PromptTraffic(server.url, rate_candidate=rating) as traffic:
            dag_run, tasks = run(fresh("rollout_model"), {"prompt": "assistant", "candidate_version": v2.version})
        assert traffic.seen["candidate"] > 0 and traffic.seen["production"] > 0
        history = prompts.history("assistant")
        if rating > 0:
            assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
            assert tasks["step_2_share"].value["share"] == 0.6
            assert prompts.by_alias("assistant").version == v2.version
            assert (history[-1].kind, history[-1].from_version, history[-1].to_version) == ("rollout", 1, 2)
            wait_for(lambda: ready(server.url)["prompt"] == {"name": "assistant", "production": 2, "canary": None,
                                                             "detail": None, "ready": True}, what="v2 in production")
        else:
            assert dag_run.state == "failed" and tasks["step_1_observe"].state == "failed"
            assert prompts.by_alias("assistant").version == v1.version and prompts.rollout("assistant") is None
            assert (history[-1].kind, history[-1].to_version) == ("declined", 2)
            wait_for(lambda: ready(server.url)["prompt"]["canary"] is None, what="the canary to end")
    assert registry.champion().version == 1  # the model never moved
