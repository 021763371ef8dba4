"""Load for the production profile's test: each run versions the one-document corpus its `n` Param describes, on
whichever Celery worker takes it (tests/e2e/test_production.py triggers twenty at once)."""

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task


@dag(schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["test"], doc_md=__doc__,
     default_args={"retries": 2}, params={"n": Param(0, type="integer", title="Corpus number")})
def version_load():
    @task
    def version() -> dict:
        import json
        import tempfile
        from pathlib import Path

        from nightshift.settings import load_settings
        from nightshift.stores import dataset_repository

        n = get_current_context()["params"]["n"]
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            corpus.write_text(json.dumps({"id": f"load-{n}", "text": f"Load document number {n}."}) + "\n")
            made = dataset_repository(load_settings()).commit(corpus, {"documents": 1})
        return {"n": n, "tag": made.tag, "md5": made.md5, "created": made.created}

    version()


version_load()
