"""
# ingest_corpus

Nightly: read a document store, clean and deduplicate it, check it with Great Expectations, and version
it with DVC. A new version updates the **corpus** asset, which schedules `finetune_model`.

| task | does |
|---|---|
| `collect_documents` | claims the DAG's lease; reads `.md`, `.txt`, `.html`, `.jsonl` under `source`, counting skips |
| `prepare_corpus` | extracts main text from HTML, fixes Unicode, normalises whitespace, drops exact duplicates |
| `validate_corpus` | Great Expectations suite (`include/configs/quality.yaml`); a failure fails the run and alerts |
| `version_dataset` | stages, pushes, commits and tags the corpus in the DVC data repository (recovers killed tries) |
| `publish_dataset` | updates the corpus asset once per version: skipped when an event already announced it |

`source` must lie inside a folder listed in `NIGHTSHIFT_SOURCE_ROOTS` (by default the bundled sample store);
links that lead out of the store and unreadable files are skipped and counted, never followed. Work files of
a run live in `$NIGHTSHIFT_HOME/work/ingest_corpus/<run_id>/`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from nightshift.airflow.common import CORPUS_ASSET, DEFAULT_ARGS, run_dir
from nightshift.settings import SAMPLE_STORE, load_settings

SCHEDULE = "0 1 * * *"
SETTINGS = load_settings()


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
            description="Local folder or file:// URI to read documents from (.md, .txt, .html, .jsonl). It must "
            "lie inside a folder listed in NIGHTSHIFT_SOURCE_ROOTS (by default only the bundled sample store).",
        ),
    },
)
def ingest_corpus():
    @task
    def collect_documents() -> dict:
        from nightshift.airflow.run_lock import claim_run
        from nightshift.pipelines.housekeeping import prune_work_dirs
        from nightshift.pipelines.ingest import collect

        context = get_current_context()
        claim_run(SETTINGS, context)
        here = run_dir(SETTINGS, context)
        prune_work_dirs(here.parent, SETTINGS.retention_days, keep=here)
        try:
            return collect(context["params"]["source"], here, SETTINGS.source_roots)
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            raise AirflowFailException(f"{exc} (set the `source` param)") from exc

    @task
    def prepare_corpus(collected: dict) -> dict:
        from nightshift.pipelines.ingest import prepare_corpus as prepare

        return prepare(run_dir(SETTINGS, get_current_context()))

    @task
    def validate_corpus(stats: dict) -> dict:
        from nightshift.pipelines.ingest import QualityGateFailed, validate
        from nightshift.quality.suite import QualityPolicy

        try:
            policy = QualityPolicy.load()
        except ValueError as exc:  # a broken quality.yaml does not mend itself on retry
            raise AirflowFailException(str(exc)) from exc
        try:
            return validate(run_dir(SETTINGS, get_current_context()), policy)
        except QualityGateFailed as exc:
            # Data does not improve on retry: fail now, alert, and create no dataset version.
            raise AirflowFailException(str(exc)) from exc

    @task
    def version_dataset(collected: dict, stats: dict, quality: dict) -> dict:
        from nightshift.pipelines.ingest import version

        return version(run_dir(SETTINGS, get_current_context()), SETTINGS, stats, collected["source"]).to_dict()

    @task(inlets=[CORPUS_ASSET], outlets=[CORPUS_ASSET])
    def publish_dataset(dataset: dict) -> dict:
        from nightshift.pipelines.ingest import needs_publishing
        from nightshift.records import DatasetVersion

        context = get_current_context()
        published = [event.extra for event in context["inlet_events"][CORPUS_ASSET]]
        if not needs_publishing(DatasetVersion.from_dict(dataset), published):
            raise AirflowSkipException(f"corpus unchanged: {dataset['tag']} was published already")
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
