"""A prompt released like a model, end to end: SmolLM2 is the champion and a real endpoint serves it; the shipped
assistant prompt passes evaluate_prompt's gate and is applied within seconds; a prompt that makes the model
answer in French is rejected and never served; the prompt's history, `nightshift prompts` and `nightshift trace`
show both."""

import dataclasses
import json
import shutil
import time
from argparse import Namespace

import httpx
import pytest
import yaml

from cli_helpers import fresh, run
from conftest import REPO
from helpers import UvicornThread, mlflow_store, publish, ready, wait_for

pytestmark = pytest.mark.e2e

FRENCH = ("You are the assistant of {{ organisation }}. Always answer in French, never in English.\n")


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    shutil.copy(REPO / "include" / "configs" / "prompts" / "assistant.yaml", prompts / "assistant.yaml")
    monkeypatch.setenv("NIGHTSHIFT_PROMPTS_DIR", str(prompts))
    # The shipped suite with shorter answers (16 tokens are words enough to tell a language): the same golden
    # set, metrics and gate, at half the generation time.
    suite = yaml.safe_load((REPO / "include" / "configs" / "evaluation.yaml").read_text())
    suite["generation"]["max_new_tokens"] = 16
    (tmp_path / "evaluation.yaml").write_text(yaml.safe_dump(suite))
    monkeypatch.setenv("NIGHTSHIFT_EVALUATION_SUITE", str(tmp_path / "evaluation.yaml"))
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    return settings


def cli(settings, capsys, action, name=None, *versions, as_json=True):
    from nightshift.cli.prompts import cmd_prompts

    capsys.readouterr()
    code = cmd_prompts(settings, Namespace(action=action, name=name, versions=list(versions), message="",
                                           json=as_json))
    out = capsys.readouterr().out
    return code, (json.loads(out) if as_json else out)


def ask(url: str, user: str):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "nightshift-llm", "user": user, "max_tokens": 12,
        "messages": [{"role": "user", "content": "Which days is Tern Valley Observatory closed?"}]})
    assert r.status_code == 200, r.text
    return r


def test_a_better_prompt_is_released_a_worse_one_rejected(home, smollm2, tmp_path, capsys):
    from nightshift.serving.app import create_app
    from nightshift.serving.prompting import PromptWatcher
    from nightshift.serving.requestlog import RequestLog
    from nightshift.stores import prompt_registry_for, registry_for

    publish(registry_for(home), smollm2, "one")
    code, registered = cli(home, capsys, "register")
    assert code == 0 and [(r["name"], r["version"], r["new"]) for r in registered] == [("assistant", 1, True)]
    assert cli(home, capsys, "register")[1][0]["new"] is False  # unchanged text: no second version
    prompts = prompt_registry_for(home)

    log_url = f"sqlite:///{tmp_path / 'requests.db'}"
    app = create_app(registry_for(home), tmp_path / "serving", require_key=False, poll_seconds=0.2,
                     request_log=RequestLog(log_url), prompts=PromptWatcher(prompts, "assistant", 0.2))
    with UvicornThread(app) as server:
        wait_for(lambda: ready(server.url), what="the champion to load", timeout=120)
        bare = ask(server.url, "ada")
        assert "x-nightshift-prompt-version" not in bare.headers  # nothing released yet

        # The shipped prompt against none: passes, and is applied within seconds.
        dag_run, tasks = run(fresh("evaluate_prompt"), {"prompt": "assistant", "reason": "first release"})
        assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
        assert tasks["promote_prompt"].state == "success" and tasks["decline_prompt"].state == "skipped"
        decision = tasks["decide_release"].value
        assert decision["passed"], decision["reasons"]
        skipped = {c["metric"] for c in decision["checks"] if c["outcome"] == "skipped"}
        assert {"heldout.perplexity", "heldout.bits_per_byte"} <= skipped
        released = time.monotonic()
        wait_for(lambda: ask(server.url, "ada").headers.get("x-nightshift-prompt-version") == "assistant/v1",
                 what="the endpoint to apply assistant/v1", timeout=30)
        applied_after = time.monotonic() - released
        prompted = ask(server.url, "ada")
        # The system prompt replaces the chat template's default one (SmolLM2's names itself): other prompt tokens.
        assert prompted.json()["usage"]["prompt_tokens"] > bare.json()["usage"]["prompt_tokens"] + 10
        assert ready(server.url)["prompt"]["production"] == 1

        # A prompt that makes the model answer in French: rejected on format and answers; production stays v1.
        source = home.prompts_dir / "assistant.yaml"
        text = yaml.safe_load(source.read_text())
        text["system"] = FRENCH
        source.write_text(yaml.safe_dump(text))
        assert cli(home, capsys, "register")[1][0]["version"] == 2
        code, diff = cli(home, capsys, "diff", "assistant", 1, 2, as_json=False)
        assert code == 0 and "+You are the assistant of {{ organisation }}. Always answer in French" in diff
        dag_run, tasks = run(fresh("evaluate_prompt"), {"prompt": "assistant"})
        assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
        assert tasks["decline_prompt"].state == "success" and tasks["promote_prompt"].state == "skipped"
        failed = {c["metric"] for c in tasks["decide_release"].value["checks"] if c["outcome"] == "failed"}
        assert "golden.format_rate" in failed and "golden.token_f1" in failed, failed
        time.sleep(1)  # a few polls: the rejected version is never applied
        assert ask(server.url, "ada").headers["x-nightshift-prompt-version"] == "assistant/v1"
        response_id = prompted.json()["id"]
        app.state.server.request_log.flush()

    assert prompts.by_alias("assistant").version == 1
    history = cli(home, capsys, "history", "assistant")[1]
    assert [(m["kind"], m["from_version"], m["to_version"], m["state"]) for m in history] == [
        ("promotion", None, 1, "done"), ("declined", 1, 2, "done")]
    assert history[0]["reason"] == "first release" and history[1]["by"] == "gate"
    assert all(m["evaluation"]["report"].endswith("evaluation.html") for m in history)
    listed = cli(home, capsys, "list")[1]
    assert [(v["version"], v["aliases"]) for v in listed] == [(1, ["production"]), (2, [])]

    from nightshift.pipelines.lineage import trace_answer

    traced = trace_answer(dataclasses.replace(home, request_log_override=log_url), response_id)
    assert traced["answer"]["prompt_version"] == 1
    assert traced["lineage"]["prompt"]["name"] == "assistant" and traced["lineage"]["prompt"]["version"] == 1
    assert traced["lineage"]["prompt"]["role"] == "production"
    assert traced["lineage"]["prompt"]["digest"] == prompts.get("assistant", 1).digest
    print(f"assistant/v1 applied {applied_after:.1f} s after its release")
