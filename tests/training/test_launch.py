"""The launcher's process group: stopped with the task, and a group left by a killed attempt is stopped first."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from nightshift.training.launch import free_port, launch_command, run_local, stop_process_group, with_master_port

# A "launcher" that starts a long-lived rank in its process group, then fails.
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "nightshift.training.trainer", sys.argv[1]])
time.sleep(0.5)
sys.exit(3)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "State:\tZ" not in fh.read()
    except FileNotFoundError:
        return False


def test_a_failed_launch_leaves_no_rank_running(tmp_path):
    marker = f"rank-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError, match="trainer exited with code 3"):
        run_local([sys.executable, "-c", LAUNCHER, marker], dict(os.environ), tmp_path / "trainer.log")
    time.sleep(0.5)
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert [p for p in out.split() if alive(int(p))] == []
    assert not (tmp_path / "trainer.pgid").exists()


def test_a_retry_first_stops_the_ranks_a_killed_attempt_left_behind(tmp_path):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "nightshift.training.trainer"],
                              start_new_session=True)
    (tmp_path / "trainer.pgid").write_text(str(orphan.pid))
    assert stop_process_group(tmp_path / "trainer.pgid", grace_s=5)
    orphan.wait(timeout=10)
    assert not alive(orphan.pid)


def test_an_unrelated_group_behind_a_stale_pgid_is_left_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        (tmp_path / "trainer.pgid").write_text(str(bystander.pid))
        assert not stop_process_group(tmp_path / "trainer.pgid", grace_s=1)
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_each_attempt_gets_its_own_port(tmp_path):
    command = launch_command(tmp_path / "trainer.json", 2, 29500)
    port = free_port()
    moved = with_master_port(command, port)
    assert moved[moved.index("--master-port") + 1] == str(port) and "29500" in command
    assert [a for a in moved if a != str(port)] == [a for a in command if a != "29500"]
