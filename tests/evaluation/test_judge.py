"""The judge against real OpenAI-compatible servers on 127.0.0.1: a scripted one, and nightshift's own endpoint."""

import json
import threading
import time

import pytest
from fastapi import FastAPI, Request

from helpers import UvicornThread, ready, wait_for
from nightshift.evaluation.harness import evaluate_model
from nightshift.evaluation.judge import Judge, JudgeEndpoint, parse_scores
from nightshift.evaluation.suite import EvaluationSuite, GoldenItem, JudgeSettings
from nightshift.settings import CONFIG_DIR

ITEMS = [GoldenItem(f"Question {i}?", f"Reference {i}.", "refuse" if i == 3 else "answer", f"q{i}") for i in range(4)]


class ScriptedJudge:
    """An OpenAI-compatible chat endpoint whose reply depends on the answer being judged."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            import asyncio

            body = await request.json()
            with self.lock:
                self.calls += 1
            text = body["messages"][-1]["content"]
            answer = text.split("Assistant's answer: ", 1)[1]
            if answer.startswith("slow"):
                await asyncio.sleep(3)
            reply = {
                "good": 'Sure. {"correctness": 5, "groundedness": 4, "refused": false}',
                "bad": '{"correctness": 1, "groundedness": 1, "refused": false}',
                "refuse": '{"correctness": 5, "groundedness": 5, "refused": true}',
                "garbled": "I would give it a 4 out of 5.",
                "outofrange": '{"correctness": 9, "groundedness": 4, "refused": false}',
            }.get(answer.split()[0], "{}")
            return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        self.app = app


@pytest.fixture
def scripted():
    judge = ScriptedJudge()
    with UvicornThread(judge.app) as server:
        judge.url = f"{server.url}/v1"
        yield judge


def test_parse_scores_takes_the_first_valid_object():
    assert parse_scores('x {"a": 1} {"correctness": 3, "groundedness": 5, "refused": false}').correctness == 0.5
    assert parse_scores('{"correctness": 0, "groundedness": 5, "refused": false}') is None
    assert parse_scores('{"correctness": 3, "groundedness": 5, "refused": "no"}') is None
    assert parse_scores("no json here") is None


def test_scores_timeouts_and_malformed_replies_are_counted_and_a_rerun_costs_nothing(scripted, tmp_path):
    settings = JudgeSettings(timeout_s=0.5, max_attempts=2, concurrency=3)
    endpoint = JudgeEndpoint(scripted.url, "judge-model", "secret")
    judge = Judge(endpoint, settings, tmp_path / "cache")
    answers = ["good answer", "garbled", "slow answer", "refuse please"]
    pairs = list(zip(ITEMS, answers, strict=True))
    scores = judge.score_all(pairs)
    assert scores[0].correctness == 1.0 and scores[0].groundedness == 0.75 and not scores[0].refused
    assert scores[1] is None and scores[2] is None and scores[3].refused
    assert judge.stats.to_dict() == {"calls": 5, "cached": 0, "scored": 2, "timeouts": 1, "errors": 0, "malformed": 1}
    served = scripted.calls

    again = Judge(endpoint, settings, tmp_path / "cache")
    scores_again = again.score_all([pairs[0], pairs[1], pairs[3]])
    assert scripted.calls == served  # cached by (judge model, prompt): no call at all
    assert again.stats.cached == 3 and again.stats.calls == 0 and scores_again[0] == scores[0]
    # Another judge model is another cache key.
    other = Judge(JudgeEndpoint(scripted.url, "other-judge", "secret"), settings, tmp_path / "cache")
    other.score(*pairs[0])
    assert scripted.calls == served + 1


def test_an_unreachable_judge_is_counted_not_raised(tmp_path):
    from conftest import free_port

    judge = Judge(JudgeEndpoint(f"http://127.0.0.1:{free_port()}/v1", "m"), JudgeSettings(timeout_s=1), tmp_path)
    assert judge.score(ITEMS[0], "good") is None and judge.stats.errors == 1 and judge.stats.calls == 2


def test_the_judge_path_through_nightshifts_own_endpoint_serving_the_tiny_model(champion, tiny_model, tmp_path):
    """A real OpenAI-compatible server with a real model as judge: its replies are not scores (malformed)."""
    from nightshift.serving.app import create_app

    registry = champion
    suite = EvaluationSuite.load(CONFIG_DIR / "evaluation.yaml")
    suite = EvaluationSuite(**{**suite.__dict__, "max_new_tokens": 4,
                               "judge": JudgeSettings(timeout_s=30, max_tokens=16, concurrency=2)})
    with UvicornThread(create_app(registry, tmp_path / "cache", require_key=False, poll_seconds=0.2)) as server:
        wait_for(lambda: ready(server.url), what="the judge model")
        judge = Judge(JudgeEndpoint(f"{server.url}/v1", "nightshift-llm"), suite.judge, tmp_path / "judge")
        report = evaluate_model(tiny_model, "candidate", None, suite, ITEMS[:3], judge)
    assert report.judge["enabled"] and report.judge["model"] == "nightshift-llm"
    assert report.judge["calls"] == 3 and report.judge["malformed"] + report.judge["scored"] == 3
    assert all("judge" in e for e in report.examples)
    json.dumps(report.to_dict())  # travels as JSON


def test_a_rollout_step_is_judged_on_logged_answers_and_fails_when_the_candidate_answers_worse(scripted, tmp_path):
    from datetime import UTC, datetime, timedelta

    from nightshift.evaluation.live import RolloutPolicy
    from nightshift.pipelines.rollout import observe_step
    from nightshift.serving.requestlog import LoggedAnswer, RequestLog

    log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    log.start()
    started = datetime.now(UTC) - timedelta(minutes=11)
    for i in range(8):
        for version, text in ((1, "good answer"), (2, "bad answer" if i % 4 else "good answer")):
            log.record(LoggedAnswer(
                response_id=f"r{version}-{i}", key_id="k", route="chat", model_name="m", model_version=version,
                model_role="champion" if version == 1 else "candidate", run_id=None, dataset_tag=None,
                request=[{"role": "user", "content": f"Question {i}? mail ada@example.org"}], answer=[text],
                finish="stop", prompt_tokens=3, completion_tokens=2, seconds=0.2, created_at=started + timedelta(
                    seconds=30)))
    plan = {"candidate": {"version": 2}, "champion": {"version": 1}}
    step = {"step": 1, "started": started.timestamp()}
    policy = RolloutPolicy(mode="canary", step_minutes=10, min_answers=5, judge_sample=6, max_judge_drop=0.1)
    judge = Judge(JudgeEndpoint(scripted.url, "judge-model"), JudgeSettings(), tmp_path / "cache")
    verdict = observe_step(log, plan, step, policy, judge=judge)
    assert verdict["ready"] and not verdict["passed"]
    failed = [r for r in verdict["reasons"] if "FAILED" in r]
    assert len(failed) == 1 and failed[0].startswith("judged correctness")
    assert verdict["signals"]["champion"]["judge_correctness"] == 1.0
    assert verdict["signals"]["candidate"]["judge_correctness"] < 0.5
    calls = scripted.calls
    assert observe_step(log, plan, step, policy, judge=judge)["passed"] is False
    assert scripted.calls == calls  # every reply came from the cache
    without = observe_step(log, plan, step, policy, judge=None, judge_note="no Airflow connection 'nightshift_judge'")
    assert without["passed"] and any("judge skipped: no Airflow connection" in r for r in without["reasons"])
    log.stop()
