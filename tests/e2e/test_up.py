"""One fresh installation served by `nightshift up`, as an operator runs it, shared by every test that needs a
running Airflow; the tests run in this file's order.

- `nightshift setup` keeps its state private and the Fernet key where Airflow reads it;
- `nightshift up` runs Airflow and the endpoint, and brings back an endpoint that died;
- the Airflow UI in a real browser (Debian's chromium, driven by Playwright): log in, trigger ingest_corpus from
  its Trigger form with a custom source, wait for the run, open its report and the nightshift page (every
  request the pages make goes to 127.0.0.1); the rollout and rollback Trigger forms; the report plugin refuses
  strangers and paths out of its folder; marking a training task failed stops every rank;
- last, SIGTERM stops every process `nightshift up` started and frees every port.

Screenshots go to var/screenshots/ (the README's come from there).
"""

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

import httpx
import psutil
import pytest

from conftest import REPO, free_port
from helpers import marked, port_is_free, stop_supervisor, wait_for
from nightshift.environment import runtime_env
from nightshift.settings import CONFIG_DIR, SAMPLE_STORE, default_parallelism, load_settings

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "var" / "screenshots"
# Chromium itself calls Google's update and account services at start-up; resolve nothing but loopback.
ARGS = ["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
NIGHTSHIFT = [sys.executable, "-m", "nightshift.cli"]


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make setup installs it from requirements-dev.txt)")
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium: `make test` installs Debian's chromium with apt-get when it runs as root "
                    "(or with sudo); run `apt-get install -y chromium` to include this test")
    return sync_playwright


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """A fresh installation (`nightshift setup`) served by `nightshift up` on free ports, as `make up` serves it."""
    tmp = tmp_path_factory.mktemp("up")
    home, store = tmp / "home", tmp / "store"
    shutil.copytree(SAMPLE_STORE, store)
    gate = tmp / "gate.yaml"  # the shipped gate; the approval test asks for a person in it
    shutil.copy(CONFIG_DIR / "gate.yaml", gate)
    marker = uuid.uuid4().hex
    ports = {"api": free_port(), "logs": free_port(), "triggerer_logs": free_port(), "serve": free_port()}
    env = {k: v for k, v in os.environ.items() if k not in runtime_env(load_settings())}  # a new installation
    env.update({
        "NIGHTSHIFT_HOME": str(home), "NS_TEST_MARKER": marker, "NIGHTSHIFT_SOURCE_ROOTS": str(store),
        # Two CPU ranks, so that marking the training task failed has more than one rank to stop.
        "NIGHTSHIFT_TRAIN_RANKS": "2", "NIGHTSHIFT_GATE_POLICY": str(gate),
        "AIRFLOW__API__PORT": str(ports["api"]),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports['api']}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports["logs"]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports["triggerer_logs"]),
    })
    setup = subprocess.run([*NIGHTSHIFT, "setup"], env=env, capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-3000:]
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([*NIGHTSHIFT, "up", "--serve-port", str(ports["serve"])], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports['api']}"
    try:
        wait_for(lambda: httpx.get(f"{base}/api/v2/monitor/health").json()["scheduler"]["status"] == "healthy",
                 240, "Airflow to be healthy", every=1)
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        yield {"base": base, "password": password, "store": store, "home": home, "env": env, "ports": ports,
               "marker": marker, "up": up, "log": tmp / "up.log", "setup": setup,
               "serve": f"http://127.0.0.1:{ports['serve']}", "gate": gate}
    finally:
        stop_supervisor(up, marker)  # after a failed test; a no-op once the last test has stopped it


def test_setup_keeps_state_private_and_the_fernet_key_where_airflow_reads_it(airflow):
    home, env, first = airflow["home"], airflow["env"], airflow["setup"]
    assert "password" in first.stdout and "shown once" in first.stdout
    private = [home / "airflow" / "airflow.db", home / "airflow" / "airflow.cfg", home / "mlflow" / "mlflow.db",
               home / "airflow" / "simple_auth_manager_passwords.json.generated", home / "serving" / "api_keys.json",
               home / "serving" / "local.key"]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    again = subprocess.run([*NIGHTSHIFT, "setup"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "shown once" not in again.stdout

    exported = subprocess.run([*NIGHTSHIFT, "env"], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "FERNET" not in exported and "AIRFLOW__API__HOST=127.0.0.1" in exported
    # One JWT secret for every Airflow process: else the API server refuses the tasks the scheduler starts.
    cfg = (home / "airflow" / "airflow.cfg").read_text()
    assert re.search(r"(?ms)^\[api_auth\]\s*^jwt_secret = \S{40,}$", cfg) and "JWT" not in exported
    # A plain airflow CLI call, with only what `nightshift env` exports, encrypts with the same key.
    plain = {**{k: v for k, v in env.items() if not k.startswith("AIRFLOW")}, **dict(
        line.removeprefix("export ").split("=", 1) for line in exported.splitlines())}
    airflow_cli = os.path.join(os.path.dirname(sys.executable), "airflow")
    added = subprocess.run([airflow_cli, "connections", "add", "probe", "--conn-type", "http", "--conn-password",
                            "s3cr3t"], env=plain, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr[-2000:]
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        encrypted, stored = db.execute("select is_encrypted, password from connection where conn_id='probe'").fetchone()
    assert encrypted and "s3cr3t" not in stored
    read = ("from nightshift.environment import configure_environment; "
            "from nightshift.settings import load_settings; configure_environment(load_settings()); "
            "from airflow.models.connection import Connection; "
            "print(Connection.get_connection_from_secrets('probe').password)")
    seen = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert seen.stdout.strip().splitlines()[-1] == "s3cr3t", seen.stderr[-2000:]  # nightshift decrypts it


def test_up_serves_airflow_and_the_endpoint_and_brings_back_a_dead_endpoint(airflow):
    home, serve, marker = airflow["home"], airflow["serve"], airflow["marker"]
    wait_for(lambda: httpx.get(f"{serve}/livez").status_code == 200, 120, "the endpoint", every=0.5)

    key_file = home / "serving" / "local.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and str(key_file) in airflow["log"].read_text()
    key = key_file.read_text().strip()
    assert httpx.get(f"{serve}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{serve}/v1/models").status_code == 401

    tree = psutil.Process(airflow["up"].pid)
    workers = wait_for(lambda: [p for p in tree.children(recursive=True) if "LocalExecutor" in cmdline(p.pid)],
                       60, "the executor's workers")
    assert len(workers) == default_parallelism()  # not Airflow's default of 32

    [endpoint] = [p for p in marked(marker) if "nightshift.cli serve" in cmdline(p)]
    os.kill(endpoint, signal.SIGKILL)
    wait_for(lambda: [p for p in marked(marker) if "nightshift.cli serve" in cmdline(p) and p != endpoint],
             30, "the endpoint to be restarted")
    wait_for(lambda: httpx.get(f"{serve}/livez").status_code == 200, 120, "the restarted endpoint", every=0.5)


def sign_in(page, base: str, password: str) -> None:
    """Log in through Airflow's own form."""
    page.goto(f"{base}/")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")


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
    sync_playwright = browser_or_skip()
    base, password = airflow["base"], airflow["password"]
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    SHOTS.mkdir(parents=True, exist_ok=True)
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        page = context.new_page()

        sign_in(page, base, password)

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
        report.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)
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
    sync_playwright = browser_or_skip()
    base, password = airflow["base"], airflow["password"]
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    for dag_id in ("rollout_model", "rollback_model"):
        rest.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def created(dag_id):  # the form's request has reached Airflow before the page moves on
        wait_for(lambda: rest.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": "manual"})
                 .json()["total_entries"], 30, f"the {dag_id} run", every=0.5)

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        sign_in(page, base, password)

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


REASON = "not before the museum's holiday hours are in the corpus"


def rated_answers(env: dict[str, str]) -> None:
    """Answers the endpoint logged half an hour before this hour began, three of them rated; one corrected."""
    from datetime import UTC, datetime, timedelta
    from unittest import mock

    from nightshift.serving.requestlog import LoggedAnswer, RequestLog

    with mock.patch.dict(os.environ, env, clear=True):
        settings = load_settings()
    settings.serving_dir.mkdir(parents=True, exist_ok=True)
    at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(minutes=30)
    request_log = RequestLog(settings.request_log_url)
    request_log.open()
    request_log.start()
    questions = ["When does the planetarium open on Sundays?", "Is there parking near the science centre?",
                 "Can I bring a tripod to the observatory?"]
    for i, question in enumerate(questions):
        request_log.record(LoggedAnswer(
            response_id=f"chatcmpl-ui{i}", key_id="k1", route="chat", model_name="nightshift-llm", model_version=1,
            model_role="champion", run_id=None, dataset_tag=None, request=[{"role": "user", "content": question}],
            answer=["It opens at ten in the morning and closes at six in the evening, every day of the week."],
            finish="stop", prompt_tokens=10, completion_tokens=20, seconds=0.3, created_at=at))
    request_log.stop()
    request_log.add_feedback("chatcmpl-ui0", "k1", -1, "The planetarium opens at ten on Sundays.", None)
    for i in (1, 2):
        request_log.add_feedback(f"chatcmpl-ui{i}", "k1", 1, None, None)


def test_required_actions_and_the_monitoring_page_in_the_browser(airflow, tiny_model):
    """A person at the Airflow UI in Chromium: the Monitoring page of the nightshift view after monitor_model ran;
    the feedback batch of harvest_feedback, approved from its Required Actions form; and a release of
    finetune_model waiting for approval (gate.yaml: approval required), rejected from its form with a reason: the
    champion does not move, the promotion history keeps who and why, the alert says who but not why. (An approval
    over the REST API is tests/e2e/test_cycle.py's full cycle.)"""
    from datetime import UTC, datetime

    sync_playwright = browser_or_skip()
    base, password, home = airflow["base"], airflow["password"], airflow["home"]
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    shutil.copytree(tiny_model, home / "models" / "tiny", dirs_exist_ok=True)
    airflow["gate"].write_text("approval: required\nrules:\n  - {metric: golden.token_f1, max_loss: 1.0}\n")
    rated_answers(airflow["env"])
    # The ingest run above queued an asset-triggered run (on SmolLM2, absent here): drop it, ours is the point.
    queued = rest.delete("/api/v2/dags/finetune_model/assets/queuedEvents")
    assert queued.status_code in (204, 404), queued.text
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0).isoformat()
    runs = {"monitor_model": {"hour_end": hour}, "harvest_feedback": {},  # (its scheduled run may take the batch)
            "finetune_model": {"base_model": "tiny", "recipe": "tiny"}}
    for dag_id, conf in runs.items():
        rest.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        rest.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"dag_run_id": f"ui-{dag_id}", "logical_date": None,
                                                          "conf": conf}).raise_for_status()

    def state(dag_id):
        return rest.get(f"/api/v2/dags/{dag_id}/dagRuns/ui-{dag_id}").json()["state"]

    def waiting(dag_id):
        """The run of ``dag_id`` whose form waits for a person (unpaused, the scheduler may start one of its own)."""
        details = rest.get(f"/api/v2/dags/{dag_id}/dagRuns/~/hitlDetails",
                           params={"response_received": "false"}).json()["hitl_details"]
        return details[0]["task_instance"]["dag_run_id"] if details else None

    wait_for(lambda: state("monitor_model") in ("success", "failed"), 300, "monitor_model", every=2)
    assert state("monitor_model") == "success"
    harvest_run = wait_for(lambda: waiting("harvest_feedback"), 120, "the feedback batch's form", every=1)

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        sign_in(page, base, password)

        # The Monitoring page, from the nightshift page's header: the hour's charts drawn.
        page.goto(f"{base}/plugin/nightshift")
        frame(page, lambda url: url.endswith("/nightshift/reports/index.html"), "nightshift page")
        page.wait_for_timeout(1000)  # the UI re-mounts the frame once it mirrors its path in the address bar
        overview = frame(page, lambda url: url.endswith("/nightshift/reports/index.html"), "nightshift page")
        overview.get_by_role("link", name="monitoring").click()
        monitoring = frame(page, lambda url: url.endswith("/nightshift/reports/monitoring.html"), "monitoring page")
        monitoring.wait_for_selector("h2#charts")
        monitoring.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=30_000)
        charts = monitoring.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert charts and all(charts), charts
        assert "v1" in monitoring.inner_text("body")
        page.screenshot(path=SHOTS / "monitoring_page.png")

        # The feedback batch: counts and scrubbed examples; approved from the form.
        page.goto(f"{base}/dags/harvest_feedback/runs/{quote(harvest_run, safe='')}/tasks/approve_batch/"
                  "required_actions")
        page.get_by_text("corrections written by raters").first.wait_for(timeout=30_000)
        page.screenshot(path=SHOTS / "feedback_approval_form.png")
        page.get_by_role("button", name="Approve").click()
        where = f"/api/v2/dags/harvest_feedback/dagRuns/{quote(harvest_run, safe='')}"
        wait_for(lambda: rest.get(where).json()["state"] in ("success", "failed"), 120, "harvest_feedback", every=1)
        assert rest.get(where).json()["state"] == "success"
        decided = rest.get(f"{where}/taskInstances/apply_decision/xcomEntries/return_value",
                           params={"stringify": "false"}).json()["value"]
        assert decided["state"] == "approved" and decided["candidates"] == 3, decided

        # The release: the gate's table, the changed answers, the report's link; rejected with a reason.
        wait_for(lambda: waiting("finetune_model") or state("finetune_model") == "failed", 480,
                 "the release's form", every=2)
        assert state("finetune_model") == "running"
        page.goto(f"{base}/dags/finetune_model/runs/ui-finetune_model/tasks/approve_release/required_actions")
        page.get_by_text("golden answers changed").first.wait_for(timeout=30_000)
        page.get_by_role("link", name="The full evaluation report").wait_for()
        page.locator("[name=element_reason]").fill(REASON)
        page.screenshot(path=SHOTS / "release_approval_form.png")
        page.get_by_role("button", name="Reject").click()
        wait_for(lambda: state("finetune_model") in ("success", "failed"), 180, "finetune_model", every=1)
        assert state("finetune_model") == "success"
    finally:
        browser.close()
        pw.stop()

    history = subprocess.run([*NIGHTSHIFT, "history", "--json"], env=airflow["env"], capture_output=True, text=True,
                             timeout=120)
    assert history.returncode == 0, history.stderr[-2000:]
    record = json.loads(history.stdout)
    assert record["moves"] == []  # nothing was promoted
    (declined,) = record["declined"]  # who and why, in the promotion history
    assert (declined["to_version"], declined["state"], declined["by"]) == (1, "rejected", "admin")
    assert declined["reason"] == REASON and declined["dag_run"] == "finetune_model/ui-finetune_model"
    alert = json.loads((home / "alerts" / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["title"].endswith("nightshift-llm v1 was not released: rejected by admin")
    assert REASON not in json.dumps(alert)  # what a person typed stays in the history
    airflow["gate"].write_text((CONFIG_DIR / "gate.yaml").read_text())


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
    from nightshift.provenance import safe_name

    base, home = airflow["base"], airflow["home"]
    shutil.copytree(tiny_model, home / "models" / "tiny", dirs_exist_ok=True)
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": airflow["password"]}) \
        .json()["access_token"]
    rest = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    run_id = f"mark-failed-{uuid.uuid4().hex[:8]}"
    # The ingest run above queued an asset-triggered run (on SmolLM2, absent here): drop it, ours is the point.
    queued = rest.delete("/api/v2/dags/finetune_model/assets/queuedEvents")
    assert queued.status_code in (204, 404), queued.text
    rest.patch("/api/v2/dags/finetune_model", json={"is_paused": False}).raise_for_status()
    rest.post("/api/v2/dags/finetune_model/dagRuns", json={
        "dag_run_id": run_id, "logical_date": None,
        "conf": {"base_model": "tiny", "recipe": "tiny", "train_steps": 1_000_000},
    }).raise_for_status()
    folder = home / "work" / "finetune_model" / safe_name(run_id)
    log = folder / "trainer.log"

    wait_for(lambda: "step 1/1000000" in log.read_text(), 480, "the training to start", every=1)
    config = str(folder / "trainer.json")
    ranks = [p for p in psutil.process_iter(["cmdline"]) if config in " ".join(p.info["cmdline"] or [])]
    assert len(ranks) >= 3  # torchrun and its two ranks (NIGHTSHIFT_TRAIN_RANKS=2)

    rest.patch(f"/api/v2/dags/finetune_model/dagRuns/{run_id}/taskInstances/train_local",
               json={"new_state": "failed"}).raise_for_status()
    wait_for(lambda: not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 90,
             "every rank to stop")
    ti = rest.get(f"/api/v2/dags/finetune_model/dagRuns/{run_id}/taskInstances/train_local").json()
    assert ti["state"] == "failed" and ti["try_number"] == 1  # marked failed: not retried


def test_sigterm_stops_every_process_up_started_and_frees_every_port(airflow):
    """Last: stop the installation the way an operator does."""
    up, marker = airflow["up"], airflow["marker"]
    tree = psutil.Process(up.pid)
    # Processes that rename themselves (setproctitle) overwrite their environment, so the marker alone
    # cannot find them: every descendant seen before the signal must be gone too.
    started = tree.children(recursive=True)
    assert len(started) >= 8
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=90) == 0
    assert marked(marker) == [], [cmdline(p) for p in marked(marker)]
    assert [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert all(port_is_free(p) for p in airflow["ports"].values())
