"""The launcher's processes: stopped with the task, and what a killed attempt left (its process group, ranks in
sessions of their own, shared-memory segments) is stopped and removed first."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nightshift.training.launch import (
    LAUNCH_ENV,
    free_port,
    launch_command,
    run_local,
    start_stamp,
    stop_process_group,
    with_master_port,
)

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


def test_ranks_in_sessions_of_their_own_and_their_shared_memory_are_stopped_by_the_launch_token(tmp_path):
    """torchrun starts each rank in a session of its own: the launch's token in their environment finds them."""
    token = uuid.uuid4().hex
    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                              env={**os.environ, LAUNCH_ENV: token}) for _ in range(2)]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                                 env={**os.environ, LAUNCH_ENV: token + "0"})
    port = str(free_port())
    segments = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}") for r in (0, 1)]
    other = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}1_0")
    try:
        for path in [*segments, other]:
            path.write_bytes(b"\0" * 64)
        record = tmp_path / "trainer.pgid"
        record.write_text(json.dumps({"pgid": 0, "launch": token, "port": port}))
        assert stop_process_group(record, grace_s=5)
        for rank in ranks:
            rank.wait(timeout=10)
        assert not any(path.exists() for path in segments) and other.exists()
        assert alive(bystander.pid) and not record.exists()
    finally:
        bystander.kill()
        bystander.wait()
        other.unlink(missing_ok=True)


def test_a_dead_task_nobody_reaped_counts_as_gone(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    stamp_while_alive = start_stamp(child.pid)
    deadline = time.monotonic() + 10
    while "State:\tZ" not in Path(f"/proc/{child.pid}/status").read_text():  # exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stamp_while_alive and start_stamp(child.pid) is None
    child.wait()
    assert start_stamp(os.getpid()) == start_stamp(os.getpid())
