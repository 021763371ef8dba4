"""Parse one DAG file in a fresh interpreter and report what parsing did, as JSON on the last line.

Connection and Variable lookups raise during the parse, so a DAG that needs them at parse time fails here.
"""

import json
import sys
import time

HEAVY = ("torch", "transformers", "deepspeed", "great_expectations", "mlflow", "whylogs", "dvc", "peft",
         "datasets", "pandas", "numpy")


def forbid(*_args, **_kwargs):
    raise RuntimeError("connection or Variable looked up at parse time")


def main(path: str) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Variable

    BaseHook.get_connection = classmethod(forbid)
    Variable.get = staticmethod(forbid)
    before = set(sys.modules)
    started = time.perf_counter()
    bag = DagBag(dag_folder=path)
    seconds = time.perf_counter() - started
    loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY))
    dags = {
        dag_id: {
            "tags": sorted(dag.tags),
            "doc_md": bool(dag.doc_md),
            "catchup": dag.catchup,
            "min_retries": min(t.retries for t in dag.tasks),
            "owners": sorted({t.owner for t in dag.tasks}),
            "undescribed_params": [k for k, p in dag.params.items() if not (p.description and p.schema.get("title"))],
            "failure_callbacks": all(t.on_failure_callback for t in dag.tasks),
            "untimed_tasks": [t.task_id for t in dag.tasks if not t.execution_timeout],
            "fileloc": dag.fileloc,
        }
        for dag_id, dag in bag.dags.items()
    }
    print(json.dumps({"import_errors": bag.import_errors, "dags": dags, "heavy": loaded, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1])
