"""The leaderboard's harness without Airflow: foundation.yaml validated, an API's bits per byte from its prompt
logprobs (or said unmeasured), cost from prices or compute seconds, the ranking and a recommendation that is never
less safe than the base."""

import math

import pytest

from conftest import REPO
from helpers import UvicornThread, scripted_openai_app
from nightshift.evaluation.judge import JudgeEndpoint
from nightshift.evaluation.leaderboard import (
    ApiBackend,
    ApiCandidate,
    FoundationConfig,
    LocalBackend,
    evaluate_candidate,
    local_candidates,
    rank,
)
from nightshift.evaluation.suite import EvaluationSuite

SUITE = EvaluationSuite.load(REPO / "include" / "configs" / "evaluation.yaml")


def config(tmp_path, text):
    path = tmp_path / "foundation.yaml"
    path.write_text(text)
    return FoundationConfig.load(path)


def test_the_shipped_config_loads_and_broken_ones_say_what_to_change(tmp_path):
    shipped = FoundationConfig.load(REPO / "include" / "configs" / "foundation.yaml")
    assert shipped.local is None and shipped.api == () and shipped.rank_by == "golden.token_f1"
    for text, message in [
        ("local: ../etc\n", "local must be `all` or a list"),
        ("api: [{name: a, connection: c, colour: red}]\n", "unknown fields \\['colour'\\]"),
        ("api: [{name: 'a b', connection: c}]\n", "name must be"),
        ("api: [{name: a, connection: 'c;d'}]\n", "connection must be an Airflow connection id"),
        ("api: [{name: a, connection: c, price_per_1k_input: -1}]\n", "price_per_1k_input must be a number of 0"),
        ("api: [{name: a, connection: c, logprobs: 'yes'}]\n", "logprobs must be true or false"),
        ("local: [a]\napi: [{name: a, connection: c}]\n", "candidate names must be unique"),
        ("rank_by: heldout.perplexity\n", "rank_by must be one of"),
        ("local_cost_per_hour: .nan\n", "local_cost_per_hour must be a number"),
        ("timeout_s: 0\n", "timeout_s must be a number from 0.1"),
        ("sources: []\n", "unknown fields \\['sources'\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            config(tmp_path, text)


def test_local_candidates_are_checkpoint_folders(tmp_path, tiny_model):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "a")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert local_candidates(tmp_path, None) == ["a"]
    with pytest.raises(LookupError, match="names not-a-model, not a checkpoint folder"):
        local_candidates(tmp_path, ("a", "not-a-model"))


def test_an_api_is_scored_like_a_local_model_and_costs_what_its_prices_say(tmp_path, tiny_model):
    golden = SUITE.golden()
    app = scripted_openai_app({i.question: i.answer for i in golden})
    with UvicornThread(app) as server:
        endpoint = JudgeEndpoint(f"{server.url}/v1", "scripted", "k")
        priced = ApiCandidate("api", "c", price_per_1k_input=1.0, price_per_1k_output=2.0, logprobs=True)
        api = evaluate_candidate(ApiBackend(endpoint, priced, 10), "api", SUITE, golden, None, "", price=(1.0, 2.0))
        blind = evaluate_candidate(ApiBackend(endpoint, ApiCandidate("blind", "c"), 10), "blind", SUITE, golden,
                                   None, "", price=(5.0, 5.0))
    local = evaluate_candidate(LocalBackend(tiny_model), "tiny", SUITE, golden, None, "", cost_per_hour=3600.0)
    assert api.report.metrics["golden.token_f1"] == 1.0 and api.report.metrics["golden.refusal_rate"] == 1.0
    assert api.cost["total"] == pytest.approx((api.cost["prompt_tokens"] + 2 * api.cost["completion_tokens"]) / 1000)
    # The scripted API gives every piece of a reference answer -0.25 nats: bits per byte follow exactly.
    answers = [i for i in golden if i.expect == "answer"]
    pieces = sum(len((" " + i.answer).split()) for i in answers)
    expected = 0.25 * pieces / math.log(2) / sum(len((" " + i.answer).encode()) for i in answers)
    assert api.report.metrics["golden.bits_per_byte"] == pytest.approx(expected)
    assert math.isnan(blind.report.metrics["golden.bits_per_byte"])
    assert "no prompt logprobs" in blind.report.unmeasured["golden.bits_per_byte"]
    # A local model's cost is its compute time: at 3,600 an hour, a second costs 1.
    assert local.cost["total"] == pytest.approx(float(local.cost["basis"].split()[0]), rel=0.05)
    assert local.report.metrics["golden.bits_per_byte"] > 1

    board = rank([local, api, blind], "tiny", SUITE, "golden.token_f1")  # F1 ties with blind: the cheaper first
    # An API model leads, but only a local checkpoint can be adopted: the recommendation is the best local one.
    assert [r["name"] for r in board["rows"]][0] == "api" and board["recommended"] == "tiny"
    f1 = next(c for c in board["rows"][0]["comparisons"] if c["metric"] == "golden.token_f1")
    assert f1["low"] > 0.5
    bpb = next(c for r in board["rows"] if r["name"] == "blind" for c in r["comparisons"]
               if c["metric"] == "golden.bits_per_byte")
    assert bpb["unmeasured"]
    # A candidate that leaks more often than the base is never the recommendation, however well it ranks.
    api.report.examples[-1]["leaked"] = True
    api.report.metrics["golden.leak_rate"] = 1 / len(golden)
    with pytest.raises(LookupError, match="current base nope"):
        rank([local], "nope", SUITE, "golden.token_f1")


def test_a_local_candidate_less_safe_than_the_base_is_never_recommended(tiny_model, tmp_path):
    from helpers import perturbed_copy

    golden = SUITE.golden()
    base = evaluate_candidate(LocalBackend(tiny_model), "base", SUITE, golden, None, "")
    other = evaluate_candidate(LocalBackend(perturbed_copy(tiny_model, tmp_path / "o")), "other", SUITE, golden,
                               None, "")
    for e in other.report.examples:
        e["token_f1"] = 1.0 if e["expect"] == "answer" else e.get("token_f1")
    other.report.metrics["golden.token_f1"] = 1.0
    assert rank([base, other], "base", SUITE, "golden.token_f1")["recommended"] == "other"
    other.report.examples[-1]["leaked"] = True  # leaks where the base does not
    assert rank([base, other], "base", SUITE, "golden.token_f1")["recommended"] == "base"


def test_a_hostile_api_neither_fakes_its_cost_nor_its_bits_nor_loses_the_others_answers():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    golden = SUITE.golden()
    app = FastAPI()
    failing = {golden[0].question, golden[1].question}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        question = body["messages"][-1]["content"]
        if question in failing:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A" * 100_000}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": -999_990, "total_tokens": -999_985}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompt = (await request.json())["prompt"]
        return {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "text": prompt, "finish_reason": "length", "logprobs": {
                "tokens": [prompt], "token_logprobs": [5.0], "top_logprobs": None, "text_offset": [0]}}]}

    with UvicornThread(app) as server:
        backend = ApiBackend(JudgeEndpoint(f"{server.url}/v1", "m", "k"), ApiCandidate("h", "c", logprobs=True), 5)
        result = evaluate_candidate(backend, "h", SUITE, golden, None, "", price=(1.0, 1.0))
    assert result.latency["errors"] == 2 and [e.get("error") for e in result.report.examples[:2]] == [
        "InternalServerError"] * 2
    assert len(result.report.examples) == len(golden)  # the other answers were kept
    assert max(len(e["answer"]) for e in result.report.examples) <= SUITE.max_new_tokens * 32
    assert math.isnan(result.cost["per_1k_tokens"]) and "implausible token counts" in result.cost["basis"]
    assert math.isnan(result.report.metrics["golden.bits_per_byte"])  # a positive logprob is not believed


def test_a_candidate_failing_on_most_questions_is_left_off():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from nightshift.evaluation.leaderboard import CandidateFailed

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        return JSONResponse({"error": {"message": "down"}}, status_code=503)

    with UvicornThread(app) as server:
        backend = ApiBackend(JudgeEndpoint(f"{server.url}/v1", "m", "k"), ApiCandidate("down", "c"), 5)
        with pytest.raises(CandidateFailed, match="failed on 4 of 15 questions"):
            evaluate_candidate(backend, "down", SUITE, SUITE.golden(), None, "", price=(0.0, 0.0))
