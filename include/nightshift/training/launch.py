"""Build the launcher command once, and run it as a local process; decide how many ranks a run gets.

The launcher is ``torchrun`` (PyTorch's elastic launcher, which DeepSpeed supports): it starts one trainer
process per rank with the rendezvous variables set, and stops them all when one fails. DeepSpeed's own
``deepspeed`` launcher does the same through two more Python processes that each import DeepSpeed, and
polls once a second: 20 s against 9 s for the same two-rank run of a tiny model here. The Kubernetes
backend runs the very same command in the trainer pod (nightshift.airflow.kubernetes).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


NODE_RANK_VAR = "NODE_RANK"
MASTER_ADDR_VAR = "MASTER_ADDR"
LAUNCHER = "torchrun"
TRAINER_MODULE = "nightshift.training.trainer"
LAUNCH_ENV = "NIGHTSHIFT_LAUNCH"


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
        ranks = requested
    elif override:
        ranks = override
    elif backend == "kubernetes":
        return pod_gpus
    else:
        return gpu_count() or 1
    gpus = gpu_count() if backend == "local" else 0
    if gpus and ranks > gpus:
        raise ValueError(f"{ranks} ranks on this machine's {gpus} GPUs: one rank per GPU at most; set the recipe's "
                         f"ranks or NIGHTSHIFT_TRAIN_RANKS to {gpus} or fewer, or auto")
    return ranks


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
    boot (never the wall-clock start time, which moves when the clock is set); None when it is gone or dead (a
    zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
        return None if fields[0] in (b"Z", b"X") else fields[19].decode()  # fields 3 (state) and 22 (start)
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    import psutil

    try:  # no /proc (not Linux)
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else f"{process.create_time():.3f}"
    except psutil.Error:
        return None


def supervised_env(env: dict[str, str], launch: str = "") -> dict[str, str]:
    """Return ``env`` naming this process as the ranks' supervisor (they stop if it disappears) and carrying the
    launch's token, by which every process of the launch can be found (``processes_of``)."""
    out = {**env, "NIGHTSHIFT_SUPERVISOR": f"{os.getpid()}:{start_stamp(os.getpid())}"}
    if launch:
        out[LAUNCH_ENV] = launch
    return out


def free_port() -> int:
    """Return a TCP port free on this machine now (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_master_port(command: list[str], port: int) -> list[str]:
    """Return the launcher command with its ``--master-port`` set to ``port``."""
    out = list(command)
    out[out.index("--master-port") + 1] = str(port)
    return out


def master_port_of(command: list[str]) -> str | None:
    """Return the rendezvous port a launcher command names, if any."""
    return command[command.index("--master-port") + 1] if "--master-port" in command[:-1] else None


def processes_of(launch: str) -> list[int]:
    """Return the live processes whose environment carries ``NIGHTSHIFT_LAUNCH=<launch>``: the launcher and its
    ranks, whatever session or process group they run in."""
    needle = f"\0{LAUNCH_ENV}={launch}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes() + b"\0" and start_stamp(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def remove_shared_memory(port: str) -> list[str]:
    """Remove the shared-memory segments DeepSpeed's CPU all-reduce made for ranks on ``port``; return their names.

    The ranks unlink them once every rank has mapped them (trainer.release_shared_memory); a rank killed in the
    moment before leaves 67 MB of RAM-backed file per rank, under a name no later run uses (each run has a port
    of its own). Called only once every process of the launch is gone.
    """
    removed = []
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    return removed


def stop_process_group(record: Path, grace_s: float = 10.0) -> bool:
    """Stop what a launch recorded in ``record`` left running; return whether anything was alive.

    That is the launcher's process group and every process carrying the launch's token (torchrun starts each
    rank in a session of its own, out of the group's reach): SIGTERM, then SIGKILL after ``grace_s``. Then the
    launch's shared-memory segments are removed. A record holding only a number (a process group) is read too.
    """
    try:
        text = record.read_text().strip()
        data = json.loads(text) if text.startswith("{") else {"pgid": int(text)}
        pgid, launch, port = int(data.get("pgid", 0)), str(data.get("launch", "")), data.get("port")
    except (OSError, ValueError, TypeError, AttributeError):
        record.unlink(missing_ok=True)
        return False
    group = pgid > 0 and _is_trainer_group(pgid)  # gone, or the id now belongs to something else: leave it alone
    members = processes_of(launch) if launch else []
    alive = bool(members) or (group and _signal_group(pgid, signal.SIGTERM))
    for pid in members:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline and (
            (group and _signal_group(pgid, 0)) or (launch and processes_of(launch))):
        time.sleep(0.2)
    if group and _signal_group(pgid, 0):
        _signal_group(pgid, signal.SIGKILL)
    for pid in processes_of(launch) if launch else []:
        _signal(pid, signal.SIGKILL)
    if port:
        removed = remove_shared_memory(str(port))
        if removed:
            log.warning("removed %d shared-memory segments the launch on port %s left behind", len(removed), port)
    record.unlink(missing_ok=True)
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


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_local(command: list[str], env: dict[str, str], log_path: Path) -> None:
    """Run the launcher in a process group of its own; stream its output to the task log and ``log_path``.

    The group, the launch's token and its port are recorded beside the log: a retry first stops what a killed
    attempt left behind, and however this call ends (failure, timeout, the task being killed, the launcher
    dying) every rank is stopped with it. The ranks also watch this process and their launcher: if either is
    killed outright (SIGKILL, no ``finally``), they stop by themselves. The log is appended to, so a retried
    attempt's log follows the killed one's.
    """
    record = log_path.with_name("trainer.pgid")
    if stop_process_group(record):
        log.warning("stopped trainer ranks left running by an earlier attempt")
    log.info("launching: %s", " ".join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    launch = uuid.uuid4().hex
    with log_path.open("a", buffering=1) as out, subprocess.Popen(
        command, env=supervised_env(env, launch), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1, start_new_session=True,
    ) as proc:
        record.write_text(json.dumps({"pgid": proc.pid, "launch": launch, "port": master_port_of(command)}))

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                tail.append(line.rstrip())
                if _worth_logging(line):
                    log.info("%s", line.rstrip())

        # Read in a thread and wait for the launcher itself: a rank that outlives it keeps the pipe open until
        # it is stopped below.
        reader = threading.Thread(target=pump, name="trainer-log", daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            stop_process_group(record, grace_s=5.0)
            reader.join(timeout=30)
    if code != 0:
        raise RuntimeError(
            f"trainer exited with code {code}; last lines (full log: {log_path}):\n" + "\n".join(tail)
        )


def _worth_logging(line: str) -> bool:
    # The launcher and libraries are chatty; keep the trainer's own lines, errors and tracebacks.
    return any(mark in line for mark in ("nightshift.", "ERROR", "Error", "Traceback", "exitcode"))
