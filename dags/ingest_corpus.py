"""
# ingest_corpus

Nightly: read a document store, clean and deduplicate it, check it with Great Expectations, and version
it with DVC. A new version updates the **corpus** asset, which schedules `finetune_model`.

| task | does |
|---|---|
| `collect_documents` | reads `.md`, `.txt`, `.html`, `.jsonl` under `source`; unreadable files are counted skips |
| `prepare_corpus` | extracts main text from HTML, fixes Unicode, normalises whitespace, drops exact duplicates |
| `validate_corpus` | Great Expectations suite (`include/configs/quality.yaml`); a failure fails the run and alerts |
| `version_dataset` | commits and tags the corpus in the DVC data repository and pushes it to the remote |
| `publish_dataset` | updates the corpus asset, only when the bytes are new (unchanged stores are skipped) |

Work files of a run live in `$NIGHTSHIFT_HOME/work/ingest_corpus/<run_id>/`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from nightshift.airflow.common import CORPUS_ASSET, DEFAULT_ARGS, run_dir
from nightshift.settings import SAMPLE_STORE, load_settings

SCHEDULE = "0 1 * * *"


@dag(
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "data"],
    doc_md=__doc__,
    params={
        "source": Param(
            str(SAMPLE_STORE),
            type="string",
            minLength=1,
            title="Document store",
            description="Local folder or file:// URI to read documents from (.md, .txt, .html, .jsonl). "
            "Defaults to the sample store bundled with nightshift.",
        ),
    },
)
def ingest_corpus():
    @task
    def collect_documents() -> dict:
        from nightshift.pipelines.ingest import collect

        context = get_current_context()
        try:
            return collect(context["params"]["source"], run_dir(load_settings(), context))
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            raise AirflowFailException(f"{exc} (set the `source` param)") from exc

    @task
    def prepare_corpus(collected: dict) -> dict:
        from nightshift.pipelines.ingest import prepare_corpus as prepare

        return prepare(run_dir(load_settings(), get_current_context()))

    @task
    def validate_corpus(stats: dict) -> dict:
        from nightshift.pipelines.ingest import QualityGateFailed, validate
        from nightshift.quality.suite import QualityPolicy

        try:
            return validate(run_dir(load_settings(), get_current_context()), QualityPolicy.load())
        except QualityGateFailed as exc:
            # Data does not improve on retry: fail now, alert, and create no dataset version.
            raise AirflowFailException(str(exc)) from exc

    @task
    def version_dataset(collected: dict, stats: dict, quality: dict) -> dict:
        from nightshift.pipelines.ingest import version

        settings = load_settings()
        return version(run_dir(settings, get_current_context()), settings, stats, collected["source"]).to_dict()

    @task(outlets=[CORPUS_ASSET])
    def publish_dataset(dataset: dict) -> dict:
        if not dataset["created"]:
            raise AirflowSkipException(f"corpus unchanged: {dataset['tag']} already holds these bytes")
        context = get_current_context()
        context["outlet_events"][CORPUS_ASSET].extra = {
            "dataset_version": dataset["tag"], "rev": dataset["rev"], "md5": dataset["md5"],
            "documents": dataset["documents"],
        }
        return dataset

    collected = collect_documents()
    stats = prepare_corpus(collected)
    quality = validate_corpus(stats)
    publish_dataset(version_dataset(collected, stats, quality))


ingest_corpus()
