"""`nightshift up` as an operator runs it: Airflow and the endpoint start, a dead endpoint comes back, and
SIGTERM stops every process it started and frees every port."""

import os
import signal
import stat
import subprocess
import sys
import uuid

import httpx
import psutil
import pytest

from conftest import free_port
from helpers import marked, port_is_free, stop_supervisor, wait_for
from nightshift.settings import default_parallelism, load_settings, runtime_env

pytestmark = pytest.mark.e2e


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_up_supervises_and_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    marker = uuid.uuid4().hex
    ports = {"api": free_port(), "logs": free_port(), "triggerer_logs": free_port(), "serve": free_port()}
    env = {k: v for k, v in os.environ.items() if k not in runtime_env(load_settings())}  # a fresh installation
    env.update({
        "NIGHTSHIFT_HOME": str(home), "NS_TEST_MARKER": marker,
        "AIRFLOW__API__PORT": str(ports["api"]),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{ports['api']}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports["logs"]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports["triggerer_logs"]),
    })
    nightshift = [sys.executable, "-m", "nightshift.cli"]
    subprocess.run([*nightshift, "setup"], env=env, check=True, capture_output=True, timeout=300)
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([*nightshift, "up", "--serve-port", str(ports["serve"])], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    serve = f"http://127.0.0.1:{ports['serve']}"
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{ports['api']}/api/v2/monitor/health").json()
                 ["scheduler"]["status"] == "healthy", 240, "Airflow to be healthy", every=1)
        wait_for(lambda: httpx.get(f"{serve}/livez").status_code == 200, 120, "the endpoint", every=0.5)

        key_file = home / "serving" / "local.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and str(key_file) in (tmp_path / "up.log").read_text()
        key = key_file.read_text().strip()
        assert httpx.get(f"{serve}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"{serve}/v1/models").status_code == 401

        tree = psutil.Process(up.pid)
        workers = wait_for(lambda: [p for p in tree.children(recursive=True) if "LocalExecutor" in cmdline(p.pid)],
                           60, "the executor's workers")
        assert len(workers) == default_parallelism()  # not Airflow's default of 32

        [endpoint] = [p for p in marked(marker) if "nightshift.cli serve" in cmdline(p)]
        os.kill(endpoint, signal.SIGKILL)
        wait_for(lambda: [p for p in marked(marker) if "nightshift.cli serve" in cmdline(p) and p != endpoint],
                 30, "the endpoint to be restarted")
        wait_for(lambda: httpx.get(f"{serve}/livez").status_code == 200, 120, "the restarted endpoint", every=0.5)

        # Processes that rename themselves (setproctitle) overwrite their environment, so the marker alone
        # cannot find them: every descendant seen before the signal must be gone too.
        started = tree.children(recursive=True)
        assert len(started) >= 8
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        assert marked(marker) == [], [cmdline(p) for p in marked(marker)]
        assert [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert all(port_is_free(p) for p in ports.values())
    finally:
        stop_supervisor(up, marker)  # after a failed assertion above; a no-op after a clean stop
