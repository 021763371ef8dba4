"""Build the ``deepspeed`` launcher command once, and run it as a local process.

The Kubernetes backend runs the very same command in the trainer pod (nightshift.airflow.kubernetes).
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def launch_command(config_path: Path, ranks: int, master_port: int) -> list[str]:
    """Return the launcher argv that starts ``ranks`` trainer processes for one run config."""
    return [
        "deepspeed",
        "--num_gpus", str(ranks),
        "--master_port", str(master_port),
        "--module", "nightshift.training.trainer",
        "--config", str(config_path),
    ]


def local_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for CPU ranks on this machine, with this interpreter's tools on PATH."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_local(command: list[str], env: dict[str, str], log_path: Path) -> None:
    """Run the launcher, streaming its output to the task log and to ``log_path``; raise on failure."""
    log.info("launching: %s", " ".join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with log_path.open("w") as out, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail.append(line.rstrip())
            if _worth_logging(line):
                log.info("%s", line.rstrip())
        code = proc.wait()
    if code != 0:
        raise RuntimeError(
            f"trainer exited with code {code}; last lines (full log: {log_path}):\n" + "\n".join(tail)
        )


def _worth_logging(line: str) -> bool:
    # The launcher and libraries are chatty; keep the trainer's own lines, errors and tracebacks.
    return any(mark in line for mark in ("nightshift.", "ERROR", "Error", "Traceback", "exits with return code"))
