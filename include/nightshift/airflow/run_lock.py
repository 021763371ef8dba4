"""One run of a DAG at a time on this installation's state, whoever started it (scheduler or `nightshift cycle`).

``max_active_runs=1`` holds only for runs the scheduler starts; ``dag.test()`` runs beside them. The first
task of a run claims a lease file under ``$NIGHTSHIFT_HOME/locks``; another run of the same DAG may take it
over only when the holder is no longer queued or running (asked of Airflow, so a crashed run never holds
the lease forever). Check and claim happen under a file lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from nightshift.settings import Settings

log = logging.getLogger(__name__)

ACTIVE = {"queued", "running"}


def claim_run(settings: Settings, context: Any) -> None:
    """Hold the DAG's lease for this run; fail at once while another run of the DAG is in progress."""
    dag_run = context["dag_run"]
    lease = settings.home / "locks" / f"{dag_run.dag_id}.json"
    lease.parent.mkdir(parents=True, exist_ok=True)
    with open(lease.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = _read(lease)
        if holder and holder.get("run_id") != dag_run.run_id:
            state = _run_state(context, dag_run.dag_id, holder["run_id"])
            if state in ACTIVE:
                raise AirflowFailException(
                    f"run {holder['run_id']} of {dag_run.dag_id} is still {state} and shares this installation's "
                    "state; start this run again when it has finished"
                )
            log.info("taking over the %s lease from run %s (%s)", dag_run.dag_id, holder["run_id"], state)
        tmp = lease.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": dag_run.run_id,
                                   "claimed_at": datetime.now(UTC).isoformat(timespec="seconds")}))
        tmp.replace(lease)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_state(context: Any, dag_id: str, run_id: str) -> str:
    """Return the state of another run of the DAG, or ``gone`` when Airflow does not know it."""
    try:
        return str(context["ti"].get_dagrun_state(dag_id=dag_id, run_id=run_id)).split(".")[-1].lower()
    except Exception as exc:  # deleted runs, or a metadata DB that was reset
        log.info("run %s of %s is unknown to Airflow (%s)", run_id, dag_id, type(exc).__name__)
        return "gone"
