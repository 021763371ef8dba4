"""The Airflow UI in a real browser (Debian's chromium, driven by Playwright), against `nightshift up`: log in,
trigger ingest_corpus from its Trigger form with a custom source, wait for the run, and open its report and the
nightshift page; every request the pages make goes to 127.0.0.1. Screenshots go to var/screenshots/."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

import httpx
import pytest

from conftest import REPO, free_port
from helpers import stop_supervisor, wait_for
from nightshift.settings import SAMPLE_STORE, load_settings, runtime_env

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "var" / "screenshots"
# Chromium itself calls Google's update and account services at start-up; resolve nothing but loopback.
ARGS = ["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make setup installs it from requirements-dev.txt)")
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium: `make test` installs Debian's chromium with apt-get when it runs as root "
                    "(or with sudo); run `apt-get install -y chromium` to include this test")
    return sync_playwright


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """A fresh installation served by `nightshift up` on free ports, as `make up` serves it."""
    sync_playwright = browser_or_skip()
    tmp = tmp_path_factory.mktemp("ui")
    home, store = tmp / "home", tmp / "store"
    shutil.copytree(SAMPLE_STORE, store)
    marker = uuid.uuid4().hex
    api, serve = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in runtime_env(load_settings())}
    env.update({
        "NIGHTSHIFT_HOME": str(home), "NS_TEST_MARKER": marker, "NIGHTSHIFT_SOURCE_ROOTS": str(store),
        "AIRFLOW__API__PORT": str(api),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
    })
    nightshift = [sys.executable, "-m", "nightshift.cli"]
    subprocess.run([*nightshift, "setup"], env=env, check=True, capture_output=True, timeout=300)
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([*nightshift, "up", "--serve-port", str(serve)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{api}"
    try:
        wait_for(lambda: httpx.get(f"{base}/api/v2/monitor/health").json()["scheduler"]["status"] == "healthy",
                 240, "Airflow to be healthy", every=1)
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        yield {"base": base, "password": password, "store": store, "home": home, "playwright": sync_playwright}
    finally:
        stop_supervisor(up, marker)


def frame(page, match, what: str, timeout: float = 30.0):
    """Wait for a frame of the page whose URL ``match`` accepts (the browser's events flow while waiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((f for f in reversed(page.frames) if match(f.url) and not f.is_detached()), None)
        if found is not None:
            return found
        page.wait_for_timeout(250)
    raise AssertionError(f"no {what} after {timeout:.0f}s; frames: {[f.url for f in page.frames]}")


def test_trigger_from_the_form_and_read_the_reports(airflow):
    base, password = airflow["base"], airflow["password"]
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    SHOTS.mkdir(parents=True, exist_ok=True)
    pw = airflow["playwright"]().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        page = context.new_page()

        # Log in through Airflow's own form.
        page.goto(f"{base}/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base}/")

        # The Trigger form shows the Param with its title and description; a custom source is typed in.
        page.goto(f"{base}/dags/ingest_corpus")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("One-off source").wait_for()
        dialog.get_by_text("It must lie under NIGHTSHIFT_SOURCE_ROOTS").wait_for()
        page.locator("#element_source").fill(str(airflow["store"]))
        page.screenshot(path=SHOTS / "trigger_form.png")
        dialog.get_by_role("button", name="Trigger").click()

        def our_run():
            runs = rest.get("/api/v2/dags/ingest_corpus/dagRuns", params={"run_type": "manual"}).json()["dag_runs"]
            return next((r for r in runs if (r.get("conf") or {}).get("source") == str(airflow["store"])), None)

        run = wait_for(our_run, 60, "the triggered run", every=1)
        run = wait_for(lambda: (r := our_run()) and r["state"] in ("success", "failed") and r, 600,
                       "the run to finish", every=3)
        assert run["state"] == "success", run

        # The run's Reports tab: the plugin's page in an iframe, its charts drawn, the Data Docs inside it.
        page.goto(f"{base}/dags/ingest_corpus/runs/{quote(run['dag_run_id'], safe='')}")
        page.get_by_text("Reports", exact=True).first.click()
        report = frame(page, lambda url: "/reports/runs/ingest_corpus/" in url and url.endswith("/index.html"),
                       "report frame")
        report.wait_for_selector("h2#profile")
        assert "corpus-v" in report.inner_text("body") and "one-off" in report.inner_text("#collection + p + table")
        charts = report.eval_on_selector_all(
            "img", "imgs => imgs.map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))")
        assert {"charts/chars.svg", "charts/words.svg", "charts/language.svg"} <= {c["src"] for c in charts}
        assert all(c["ok"] for c in charts), charts
        docs = frame(page, lambda url: "/datadocs/validations/documents/" in url, "Data Docs frame")
        docs.wait_for_selector("text=Expectation Validation Result")
        assert "pii_hits" in docs.inner_text("body")
        page.screenshot(path=SHOTS / "run_reports_tab.png")

        # The same page on its own, whole, for the README.
        own = context.new_page()
        own.goto(report.url)
        own.wait_for_selector("h2#quality")
        own.wait_for_timeout(500)
        own.screenshot(path=SHOTS / "ingest_report.png", full_page=True)

        # The nightshift page from the navigation: the new dataset version, linked to its run's report.
        page.goto(f"{base}/plugin/nightshift")
        frame(page, lambda url: url.endswith("/nightshift/reports/index.html"), "nightshift page")
        page.wait_for_timeout(1000)  # the UI re-mounts the frame once it mirrors its path in the address bar
        overview = frame(page, lambda url: url.endswith("/nightshift/reports/index.html"), "nightshift page")
        overview.wait_for_selector("h2#datasets")
        assert "corpus-v" in overview.inner_text("#datasets + table")
        page.screenshot(path=SHOTS / "nightshift_page.png")

        hosts = {urlparse(url).hostname for url in requests if url.startswith(("http:", "https:", "ws:", "wss:"))}
        assert hosts == {"127.0.0.1"}, hosts
    finally:
        browser.close()
        pw.stop()


def test_rollout_and_rollback_forms_take_their_params_and_refuse_without_a_champion(airflow):
    """Both registry DAGs from their Trigger forms: the Params show their titles; with no champion yet each run
    fails at its first task with the reason, once (a refusal is not retried)."""
    base, password = airflow["base"], airflow["password"]
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    for dag_id in ("rollout_model", "rollback_model"):
        rest.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def created(dag_id):  # the form's request has reached Airflow before the page moves on
        wait_for(lambda: rest.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": "manual"})
                 .json()["total_entries"], 30, f"the {dag_id} run", every=0.5)

    pw = airflow["playwright"]().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.goto(f"{base}/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base}/")

        page.goto(f"{base}/dags/rollout_model")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Candidate version").wait_for()
        dialog.get_by_text("canary: a growing share of users").wait_for()
        page.locator("[name=element_candidate_version]").fill("7")
        page.screenshot(path=SHOTS / "rollout_trigger_form.png")
        dialog.get_by_role("button", name="Trigger").click()
        created("rollout_model")

        page.goto(f"{base}/dags/rollback_model")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Reason").first.wait_for()
        page.locator("[name=element_reason]").fill("answers about tickets are wrong")
        page.screenshot(path=SHOTS / "rollback_trigger_form.png")
        dialog.get_by_role("button", name="Trigger").click()
        created("rollback_model")
    finally:
        browser.close()
        pw.stop()

    for dag_id, first, conf in (("rollout_model", "plan_rollout", ("candidate_version", 7)),
                                ("rollback_model", "plan_rollback", ("reason", "answers about tickets are wrong"))):
        def finished(dag_id=dag_id, conf=conf):
            runs = rest.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": "manual"}).json()["dag_runs"]
            run = next((r for r in runs if (r.get("conf") or {}).get(conf[0]) == conf[1]), None)
            return run if run and run["state"] in ("success", "failed") else None

        run = wait_for(finished, 300, f"the {dag_id} run to finish", every=2)
        assert run["state"] == "failed", run
        ti = rest.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run['dag_run_id'], safe='')}/taskInstances/{first}").json()
        assert ti["state"] == "failed" and ti["try_number"] == 1, ti


def test_the_plugin_refuses_strangers_and_paths_out_of_its_folder(airflow):
    base = airflow["base"]
    assert httpx.get(f"{base}/nightshift/reports/index.html").status_code == 401
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": airflow["password"]}) \
        .json()["access_token"]
    (airflow["home"] / "outside.txt").write_text("not a report")
    for path in ("../outside.txt", "..%2Foutside.txt", "%2e%2e/%2e%2e/home/outside.txt", "../airflow/airflow.cfg"):
        response = httpx.get(f"{base}/nightshift/reports/{path}", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 404 and "not a report" not in response.text, path
    assert time.time()  # the server stays up after the attempts
    assert httpx.get(f"{base}/nightshift/reports/index.html",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_marking_the_training_task_failed_stops_every_rank(airflow, tiny_model):
    """A person marks a running train_local failed (the UI's "Mark as failed" calls this same REST route): no rank
    of that training outlives it. Runs after the ingest test above, whose corpus version it trains on."""
    import psutil

    from nightshift.provenance import safe_name

    base, home = airflow["base"], airflow["home"]
    shutil.copytree(tiny_model, home / "models" / "tiny", dirs_exist_ok=True)
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": airflow["password"]}) \
        .json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    run_id = f"mark-failed-{uuid.uuid4().hex[:8]}"
    rest.patch("/api/v2/dags/finetune_model", json={"is_paused": False}).raise_for_status()
    rest.post("/api/v2/dags/finetune_model/dagRuns", json={
        "dag_run_id": run_id, "logical_date": None,
        "conf": {"base_model": "tiny", "recipe": "tiny", "train_steps": 1_000_000},
    }).raise_for_status()
    folder = home / "work" / "finetune_model" / safe_name(run_id)
    log = folder / "trainer.log"

    # An asset-triggered run of the ingest test may go first (max_active_runs=1); it fails fast (no SmolLM2 here).
    wait_for(lambda: "step 1/1000000" in log.read_text(), 480, "the training to start", every=1)
    config = str(folder / "trainer.json")
    ranks = [p for p in psutil.process_iter(["cmdline"]) if config in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) >= 4  # the deepspeed runner, its launcher and two ranks

    rest.patch(f"/api/v2/dags/finetune_model/dagRuns/{run_id}/taskInstances/train_local",
               json={"new_state": "failed"}).raise_for_status()
    wait_for(lambda: not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 90,
             "every rank to stop")
    ti = rest.get(f"/api/v2/dags/finetune_model/dagRuns/{run_id}/taskInstances/train_local").json()
    assert ti["state"] == "failed" and ti["try_number"] == 1  # marked failed: not retried
