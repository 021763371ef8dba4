"""select_foundation_model end to end: a local model imported by the run, the current base, a scripted
OpenAI-compatible API and nightshift's own endpoint as a second API model go through one harness; the leaderboard
page (opened in Chromium), the MLflow run, a person adopting a base in Required Actions, and finetune_model taking
that base by default."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cli_helpers import Approver, fresh, run
from conftest import REPO, free_port
from helpers import UvicornThread, mlflow_store, perturbed_copy, publish, ready, scripted_openai_app, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "var" / "screenshots"


def connection(monkeypatch, name: str, url: str, model: str) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps({
        "conn_type": "http", "host": f"{url}/v1", "password": "test-key", "extra": {"model": model}}))


@pytest.fixture
def home(tmp_path, monkeypatch, airflow_db, tiny_model):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")  # the REST client's token
    settings = load_settings()
    mlflow_store(settings.mlflow_dir / "mlflow.db")
    shutil.copytree(tiny_model, settings.models_dir / "tiny-base")
    # The suite with short answers: tiny random models write nonsense, the length is what costs.
    suite = yaml.safe_load((REPO / "include" / "configs" / "evaluation.yaml").read_text())
    suite["generation"]["max_new_tokens"] = 8
    (tmp_path / "evaluation.yaml").write_text(yaml.safe_dump(suite))
    monkeypatch.setenv("NIGHTSHIFT_EVALUATION_SUITE", str(tmp_path / "evaluation.yaml"))
    return settings


def test_candidates_are_ranked_chosen_and_the_choice_is_finetunes_default(home, tiny_model, tmp_path, monkeypatch):
    from nightshift.evaluation.suite import load_golden
    from nightshift.pipelines import foundation
    from nightshift.pipelines.run import Run
    from nightshift.serving.app import create_app
    from nightshift.stores import registry_for

    # An earlier choice made tiny-base the base (a first installation's base is the bundled SmolLM2).
    foundation.record_choice(home, Run(home, "select_foundation_model", "earlier"), {
        "rows": [{"name": "tiny-base", "kind": "local", "metrics": {}}], "recommended": "tiny-base",
        "rank_by": "golden.token_f1"}, {"approved": True, "by": "ada", "reason": "first base", "candidate": None})
    assert foundation.current_base(home) == "tiny-base"

    golden = load_golden(REPO / "include" / "samples" / "golden_qa.jsonl")
    scripted = scripted_openai_app({item.question: item.answer for item in golden}, delay_s=0.02)
    registry = registry_for(home)
    publish(registry, tiny_model, "served")
    config = tmp_path / "foundation.yaml"
    config.write_text(yaml.safe_dump({
        "local": "all", "local_cost_per_hour": 0.5, "rank_by": "golden.token_f1",
        "api": [{"name": "scripted-api", "connection": "scripted_api", "price_per_1k_input": 0.15,
                 "price_per_1k_output": 0.6, "logprobs": True},
                {"name": "nightshift-endpoint", "connection": "own_endpoint", "logprobs": True},
                {"name": "down-api", "connection": "down_api"}]}))
    monkeypatch.setenv("NIGHTSHIFT_FOUNDATION_CONFIG", str(config))
    candidate_folder = perturbed_copy(tiny_model, tmp_path / "export" / "tiny-candidate")
    (candidate_folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")  # never copied

    own = create_app(registry, tmp_path / "serving", require_key=False, poll_seconds=0.2)
    with UvicornThread(scripted) as api, UvicornThread(own) as endpoint:
        wait_for(lambda: ready(endpoint.url), what="nightshift's endpoint")
        connection(monkeypatch, "scripted_api", api.url, "scripted")
        connection(monkeypatch, "own_endpoint", endpoint.url, "nightshift-llm")
        connection(monkeypatch, "down_api", f"http://127.0.0.1:{free_port()}", "gone")  # nothing listens there
        with Approver("select_foundation_model", "Adopt",
                      {"candidate": "tiny-candidate", "reason": "closest to the base, imported today"}) as person:
            dag_run, tasks = run(fresh("select_foundation_model"),
                                 {"import_from": str(candidate_folder), "import_as": "tiny-candidate"})
        assert person.error is None, person.error
        assert dag_run.state == "success", {t: r.state for t, r in tasks.items()}
        assert tasks["build_leaderboard"].state == "success"
        assert api.server.started and scripted.state.calls["chat"] == len(golden)
        assert scripted.state.calls["completions"] == sum(i.expect == "answer" for i in golden)

    imported = home.models_dir / "tiny-candidate"
    assert not (imported / "modeling_evil.py").exists() and (imported / "model.safetensors").is_file()
    board = tasks["build_leaderboard"].value
    assert board["failed"] == ["down-api"]  # an API that is down is named, and costs the others nothing
    rows = {row["name"]: row for row in board["rows"]}
    assert set(rows) == {"tiny-base", "tiny-candidate", "scripted-api", "nightshift-endpoint"}
    assert board["base"] == "tiny-base" and rows["tiny-base"]["base"]
    # The scripted API answers every question with its reference: it leads on F1 and format, at its prices.
    assert board["rows"][0]["name"] == "scripted-api" and rows["scripted-api"]["metrics"]["golden.token_f1"] == 1.0
    assert rows["scripted-api"]["metrics"]["golden.refusal_rate"] == 1.0
    assert rows["scripted-api"]["cost"]["basis"].startswith("the API's prices")
    usage = rows["scripted-api"]["cost"]
    expected = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1000
    assert abs(usage["total"] - expected) < 1e-12
    assert rows["tiny-base"]["cost"]["basis"].endswith("seconds answering at local_cost_per_hour")
    # Bits per byte from prompt logprobs for every candidate: local models, the scripted API, nightshift's endpoint.
    for name in rows:
        assert isinstance(rows[name]["metrics"]["golden.bits_per_byte"], float), (name, rows[name]["unmeasured"])
    # nightshift's endpoint serves the same weights as tiny-base: the same bits per byte, read through the API.
    assert abs(rows["nightshift-endpoint"]["metrics"]["golden.bits_per_byte"]
               - rows["tiny-base"]["metrics"]["golden.bits_per_byte"]) < 1e-3
    f1 = next(c for c in rows["scripted-api"]["comparisons"] if c["metric"] == "golden.token_f1")
    assert f1["low"] > 0 and f1["n"] == sum(i.expect == "answer" for i in golden)  # better, with its interval
    assert rows["scripted-api"]["latency_vs_base"]["n"] == len(golden)
    assert all(row["seconds"] > 0 for row in board["rows"])
    # The API leads but is a baseline: the recommendation is a local checkpoint; the person typed the imported one.
    assert board["recommended"] in {"tiny-base", "tiny-candidate"}
    choice = tasks["record_choice"].value
    assert (choice["base"], choice["previous"], choice["changed"]) == ("tiny-candidate", "tiny-base", True)
    assert choice["reason"] == "closest to the base, imported today" and choice["by"] != "timeout"
    assert foundation.current_base(home) == "tiny-candidate"

    from nightshift.pipelines.finetune_tasks import parse_request

    request = parse_request(Run(home, "finetune_model", "next"), {"recipe": "tiny", "train_steps": 1,
                                                                  "learning_rate": None, "backend": "local",
                                                                  "dataset_version": None, "nodes": 1})
    assert request["base_model"] == "tiny-candidate"

    mlflow_run = registry_for(home).client.get_run(board["mlflow_run_id"])
    assert mlflow_run.data.metrics["scripted-api.golden.token_f1"] == 1.0
    page = home.reports_dir / "leaderboard.html"
    assert page.is_file()
    _look_at(page)


def _look_at(page: Path) -> None:
    """Open the leaderboard page in Chromium: the ranking's rows and the charts render."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make setup installs it from requirements-dev.txt)")
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium (make test installs Debian's chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            view = browser.new_page(viewport={"width": 1400, "height": 1000})
            view.goto(page.as_uri())
            assert view.locator("#leaderboard tr").count() == 5  # the header and four candidates
            assert view.locator("#recommended").inner_text() in {"tiny-base", "tiny-candidate"}
            assert view.locator("figure svg").count() == 3
            assert view.locator("figure svg").first.bounding_box()["height"] > 100
            SHOTS.mkdir(parents=True, exist_ok=True)
            view.screenshot(path=SHOTS / "leaderboard.png", full_page=True)
        finally:
            browser.close()
