"""Build the launcher command once, and run it as a local process; decide how many ranks a run gets.

The launcher is ``torchrun`` (PyTorch's elastic launcher, which DeepSpeed supports): it starts one trainer
process per rank with the rendezvous variables set, and stops them all when one fails. DeepSpeed's own
``deepspeed`` launcher does the same through two more Python processes that each import DeepSpeed, and
polls once a second: 20 s against 9 s for the same two-rank run of a tiny model here. The Kubernetes
backend runs the very same command in the trainer pod (nightshift.airflow.kubernetes).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


NODE_RANK_VAR = "NODE_RANK"
MASTER_ADDR_VAR = "MASTER_ADDR"
LAUNCHER = "torchrun"
TRAINER_MODULE = "nightshift.training.trainer"


def launch_command(config_path: Path, ranks: int, master_port: int) -> list[str]:
    """Return the launcher argv that starts ``ranks`` trainer processes on this node for one run config."""
    return [
        LAUNCHER,
        "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1",
        "--master-port", str(master_port),
        "--module", TRAINER_MODULE,
        "--config", str(config_path),
    ]


def node_command(config_path: Path, nodes: int, ranks_per_node: int, master_port: int) -> list[str]:
    """Return the launcher argv every node of a multi-node run executes, the same on each.

    Each node starts its own ``ranks_per_node`` ranks; ``$(NODE_RANK)`` and ``$(MASTER_ADDR)`` (node 0,
    which hosts the rendezvous) are filled from the node's environment by Kubernetes when it starts the
    container.
    """
    return [
        LAUNCHER,
        "--nnodes", str(nodes),
        "--nproc-per-node", str(ranks_per_node),
        "--node-rank", f"$({NODE_RANK_VAR})",
        "--master-addr", f"$({MASTER_ADDR_VAR})",
        "--master-port", str(master_port),
        "--module", TRAINER_MODULE,
        "--config", str(config_path),
    ]


def gpu_count() -> int:
    """Return the CUDA GPUs this process can use (0 on a machine without them)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_ranks(requested: int | str, backend: str, override: int | None, pod_gpus: int) -> int:
    """Return the ranks per node of a run: the recipe's number, else NIGHTSHIFT_TRAIN_RANKS, else ``auto``.

    ``auto`` is one rank per GPU: the GPUs of this machine (local backend; one rank using every core when
    there are none) or of each trainer pod (kubernetes backend, NIGHTSHIFT_K8S_GPUS). On CPU, two ranks on
    the same cores only add ZeRO's traffic between them: one rank trains faster.
    """
    if isinstance(requested, int) and not isinstance(requested, bool):
        return requested
    if override:
        return override
    if backend == "kubernetes":
        return pod_gpus
    return gpu_count() or 1


def usable_cores() -> int:
    """Return the cores this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for ranks on this machine (CPU ranks without a GPU), this interpreter's tools on PATH."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if "DS_ACCELERATOR" not in env and not gpu_count():
        env["DS_ACCELERATOR"] = "cpu"
    if env.get("DS_ACCELERATOR") == "cpu":
        # glibc hands every large tensor back to the kernel when it is freed and faults it in again at the next
        # step; training allocates the same sizes every step, so keep freed memory in the process instead
        # (what tcmalloc or jemalloc do for CPU training): 8% more tokens/s for SmolLM2 here.
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 40))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def start_stamp(pid: int) -> str | None:
    """Return what tells this process apart from any later one with the same pid: its start, in clock ticks after
    boot (never the wall-clock start time, which moves when the clock is set); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()  # field 22, after the command name
    except (OSError, IndexError):
        pass
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.3f}"  # no /proc (not Linux)
    except psutil.Error:
        return None


def supervised_env(env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` naming this process as the ranks' supervisor: they stop if it disappears."""
    return {**env, "NIGHTSHIFT_SUPERVISOR": f"{os.getpid()}:{start_stamp(os.getpid())}"}


def free_port() -> int:
    """Return a TCP port free on this machine now (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_master_port(command: list[str], port: int) -> list[str]:
    """Return the launcher command with its ``--master_port`` set to ``port``."""
    out = list(command)
    out[out.index("--master-port") + 1] = str(port)
    return out


def stop_process_group(pgid_file: Path, grace_s: float = 10.0) -> bool:
    """Stop the process group recorded in ``pgid_file`` (SIGTERM, then SIGKILL); return whether one was alive."""
    try:
        pgid = int(pgid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if not _is_trainer_group(pgid):  # gone, or the id now belongs to something else: leave it alone
        pgid_file.unlink(missing_ok=True)
        return False
    alive = _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline and _signal_group(pgid, 0):
        time.sleep(0.2)
    if _signal_group(pgid, 0):
        _signal_group(pgid, signal.SIGKILL)
    pgid_file.unlink(missing_ok=True)
    return alive


def _is_trainer_group(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and any(LAUNCHER in part or "nightshift.training" in part
                                                    for part in proc.info["cmdline"] or []):
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_local(command: list[str], env: dict[str, str], log_path: Path) -> None:
    """Run the launcher in a process group of its own; stream its output to the task log and ``log_path``.

    The group id is recorded beside the log: a retry first stops a group that a killed attempt left behind,
    and however this call ends (failure, timeout, the task being killed) the ranks are stopped with it. The
    ranks also watch this process: if it is killed outright (SIGKILL, no ``finally``), they stop by themselves.
    The log is appended to, so a retried attempt's log follows the killed one's.
    """
    pgid_file = log_path.with_name("trainer.pgid")
    if stop_process_group(pgid_file):
        log.warning("stopped trainer ranks left running by an earlier attempt")
    log.info("launching: %s", " ".join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with log_path.open("a", buffering=1) as out, subprocess.Popen(
        command, env=supervised_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,
    ) as proc:
        pgid_file.write_text(str(proc.pid))

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                tail.append(line.rstrip())
                if _worth_logging(line):
                    log.info("%s", line.rstrip())

        # Read in a thread and wait for the launcher itself: a rank that outlives it keeps the pipe open.
        reader = threading.Thread(target=pump, name="trainer-log", daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            stop_process_group(pgid_file, grace_s=5.0)
            reader.join(timeout=30)
    if code != 0:
        raise RuntimeError(
            f"trainer exited with code {code}; last lines (full log: {log_path}):\n" + "\n".join(tail)
        )


def _worth_logging(line: str) -> bool:
    # The launcher and libraries are chatty; keep the trainer's own lines, errors and tracebacks.
    return any(mark in line for mark in ("nightshift.", "ERROR", "Error", "Traceback", "exitcode"))
