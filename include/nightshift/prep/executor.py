"""Where a night's per-document steps run: datatrove's executors (local processes, Slurm or Ray), and the watch
kept over a local process pool, whose workers can die (the out-of-memory killer) or fail to start without the
pool ever saying so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from nightshift.faults import fault_point
from nightshift.prep.recipe import PrepRecipe


def plan_tasks(recipe: PrepRecipe, raw_bytes: int) -> tuple[int, int]:
    """Return (tasks, workers): one task per 4 MB up to one per worker; small nights run in this process."""
    import os

    workers = recipe.executor.workers or (os.cpu_count() or 1)
    tasks = recipe.executor.tasks or max(1, min(workers, raw_bytes // (4 * 1024 * 1024) + 1))
    return tasks, min(workers, tasks)


def build_executor(recipe: PrepRecipe, pipeline: list, tasks: int, workers: int, logging_dir: Path):
    """Return the datatrove executor the recipe names, running ``pipeline`` over ``tasks`` shards."""
    kind, options = recipe.executor.kind, dict(recipe.executor.options)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        options.setdefault("time", "04:00:00")
        options.setdefault("job_name", "nightshift-prep")
        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logging_dir), **options)
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logging_dir), **options)
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                 skip_completed=True, **options)


WORKER_START_TIMEOUT_S = 120.0
"""How long a preparation worker may take to start and import the steps before the task fails."""


class WorkerStartError(RuntimeError):
    """The preparation workers cannot start; the message says why and what to change."""


def _worker_ready() -> None:
    """Import every step in a fresh worker, as a preparation task does first (the pool's handshake)."""
    import importlib

    for step in ("steps", "shard_worker", "heuristics", "near_dup"):
        importlib.import_module(f"nightshift.prep.{step}")
    fault_point("prep.worker_start")


def _main_module_problem(start_method: str) -> str | None:
    """Return why a new process of this start method cannot import this process's main module, or None."""
    import os

    if start_method == "fork":
        return None
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return None  # started with -m: workers import it by name
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        return None  # an interactive session or -c has nothing to re-import; a script file is re-imported
    return (f"preparation workers cannot start: the {start_method!r} process pool starts each worker by "
            "re-running the main script, and this process's main script has no file (it was read from standard "
            "input, e.g. 'python -', or typed in a console). Run the script from a file, run the DAG through "
            "Airflow or 'airflow dags test', or set executor.workers: 1 in the preparation recipe to prepare "
            "in this process")


def check_workers_start(start_method: str, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
    """Return once a worker of the pool's kind has started and imported the steps; raise WorkerStartError if not.

    datatrove's local executor runs its tasks on a ``multiprocess`` pool, and such a pool replaces a worker that
    dies while starting with another that dies the same way, for ever (each printing its traceback), so one
    worker is started first, alone, and must come up within ``timeout_s``.
    """
    import multiprocess

    problem = _main_module_problem(start_method)
    if problem:
        raise WorkerStartError(problem)
    hint = "Set executor.workers: 1 in the preparation recipe to prepare in this process."
    try:
        proc = multiprocess.get_context(start_method).Process(target=_worker_ready, daemon=True)
        proc.start()
    except Exception as exc:
        raise WorkerStartError(f"preparation workers cannot start: starting a {start_method!r} process failed "
                               f"({type(exc).__name__}: {exc}). {hint}") from exc
    proc.join(timeout_s)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise WorkerStartError(f"preparation workers cannot start: a {start_method!r} worker did not import the "
                               f"steps within {timeout_s:g}s (an overloaded machine, or an import that hangs). "
                               f"{hint}")
    if proc.exitcode != 0:
        raise WorkerStartError(f"preparation workers cannot start: a {start_method!r} worker exited with code "
                               f"{proc.exitcode} while starting (its traceback is printed above; a script that "
                               "prepares must do so under 'if __name__ == \"__main__\":', as every worker re-runs "
                               f"it). {hint}")


WORKER_POLL_S = 0.5
"""How often the pool's processes are checked while the preparation tasks run."""
LOST_TASK_GRACE_S = 2.0
"""How long a run may take to end after one of its processes died before that process's task counts as lost."""
SHUTDOWN_GRACE_S = 30.0
"""The same for an exit the pool itself causes when it stops (code 0 or SIGTERM): it ends the run shortly after."""


class WorkerDied(RuntimeError):
    """A preparation worker died while the tasks ran, so its task's result will never come; the message says why."""


def _death_reason(exitcode: int | None) -> str:
    """Return how a process ended, in words, with what to do about it."""
    import signal

    if exitcode is None or exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = "unknown signal"
    reason = f"was killed by signal {-exitcode} ({name})"
    if -exitcode == signal.SIGKILL:
        reason += (", most often by the out-of-memory killer: lower executor.workers or raise executor.tasks "
                   "(smaller shards) in the preparation recipe, or give the task more memory")
    return reason


def run_supervised(executor, poll_s: float = WORKER_POLL_S) -> None:
    """Run a local executor's process pool; return when it ends, or raise WorkerDied when a process dies under it.

    A ``multiprocess`` pool replaces a worker that dies (the out-of-memory killer's SIGKILL, a crash in a native
    library) and waits for ever for the dead worker's result, so the run is watched from here: a process of the
    run that ends while the run does not is a lost task. The pool is then stopped and the task fails; a retry
    resumes, as finished tasks are kept and a task's partial files are rewritten from the start.
    """
    import signal
    import threading

    import multiprocess
    from multiprocess.connection import wait

    before = set(multiprocess.active_children())
    done = threading.Event()
    failed: list[BaseException] = []

    def target() -> None:
        try:
            executor.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=target, name="nightshift-prep-executor", daemon=True)
    watched: list = []
    dead: dict = {}  # process -> when it was seen dead
    thread.start()
    try:
        while not done.wait(poll_s):
            watched += [p for p in multiprocess.active_children() if p not in before and p not in watched]
            alive = {_sentinel(p): p for p in watched if p not in dead}
            alive.pop(None, None)
            # Waiting on sentinels reads no exit status, which the pool's own thread collects for its workers.
            for sentinel in wait(list(alive), timeout=0):
                dead[alive[sentinel]] = time.monotonic()
            now = time.monotonic()
            for proc, since in dead.items():
                waited = now - since
                if waited < LOST_TASK_GRACE_S:
                    # Its exit status is not read before: the pool's own thread reads its workers' first, and a
                    # second reader at the same moment would find it gone.
                    continue
                if waited >= SHUTDOWN_GRACE_S or proc.exitcode not in (0, -signal.SIGTERM):
                    raise WorkerDied(
                        f"preparation process {proc.name} (pid {proc.pid}) {_death_reason(proc.exitcode)}. Its "
                        "task's result is lost, so the other tasks were stopped; a retry resumes from the tasks "
                        "that finished")
    except BaseException as exc:
        _stop_run(watched, before, exc, done)
        raise
    if failed:
        raise failed[0]


def _sentinel(proc) -> int | None:
    """Return the handle that becomes ready when ``proc`` ends, or None once it was closed."""
    try:
        return proc.sentinel
    except ValueError:
        return None


def _stop_run(watched: list, before: set, error: BaseException, done) -> None:
    """Stop the run that ``error`` interrupted: fail the pool's pending results, then kill what is left.

    The pool is found by its workers: datatrove keeps it in a local variable. Handing its pending results an
    error is what the pool itself does for a task that raised, so datatrove's own clean-up (stopping the pool's
    workers and its manager) then runs as it does for a failed task.
    """
    import gc

    import multiprocess
    from multiprocess.pool import Pool

    procs = [*watched, *(p for p in multiprocess.active_children() if p not in before and p not in watched)]
    pids = {p.pid for p in procs}
    pools = [o for o in gc.get_objects() if isinstance(o, Pool) and pids & {w.pid for w in getattr(o, "_pool", ())}]
    stop = RuntimeError(f"preparation stopped: {type(error).__name__}")  # its own object: one traceback each
    for pool in pools:
        for job in list(getattr(pool, "_cache", {}).values()):
            try:
                job._set(0, (False, stop))
            except Exception:  # noqa: BLE001, S112 - a pool of another shape is terminated below instead
                continue
    if done.wait(10):
        return
    for pool in pools:
        pool.terminate()
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
