"""
# ingest_corpus

Nightly: collect every source of `include/configs/sources.yaml` (folders and object stores, websites,
database tables), clean and deduplicate them into one corpus, check it with Great Expectations, and version
it with DVC. A new version updates the **corpus** asset, which schedules `finetune_model`.

| task | does |
|---|---|
| `plan_sources` | claims the DAG's lease; the sources of sources.yaml, or the one the `source` Param names |
| `collect_source` | one mapped task per source, labelled by its name: reads, crawls or queries it, counting skips |
| `merge_sources` | combines what came in; fails the night when fewer than `min_source_share` of the sources did |
| `prepare_corpus` | `include/configs/prep.yaml` on datatrove: language, quality, decontamination, PII, near-dups |
| `check_drop_budget` | warns when one preparation step dropped more than quality.yaml's `drop_budget` of a source |
| `profile_corpus` | whylogs profile of per-document metrics; drift from the previous and the champion's data |
| `validate_corpus` | (beside it) Great Expectations on the same per-document metrics, as Data Docs; fails, alerts |
| `version_dataset` | stages, pushes, commits, tags corpus and profile in the DVC repository (killed tries recover) |
| `index_corpus` | chunks and embeds the version's documents into its vector index (`retrieval.yaml`): only chunks \
whose text is new are embedded, the rest come from the cache; the counts are on the run's page |
| `publish_dataset` | updates the corpus asset once per version: skipped when an event already announced it |

A source that fails (a site that is down, a database that refuses) fails its own mapped task, which alerts;
the others are versioned. A site whose robots.txt cannot be read tonight is not crawled: its pages of the last
night are reused from the crawl state. The `source` Param must name something under `NIGHTSHIFT_SOURCE_ROOTS`
(by default only the bundled sample store); a URL root there bounds every request of the crawl (scheme, host,
port and path). Ids, URLs and other metadata are scrubbed of personal data and credentials before anything is
written. Per-source reports (fetched, unchanged, reused, skipped by reason, robots blocks, budget hits) are in
`$NIGHTSHIFT_HOME/work/ingest_corpus/<run_id>/collection.json`; crawl state and SQL snapshots persist in
`$NIGHTSHIFT_HOME/sources/<name>/`. What preparation removed, per step and reason with example ids, is in
`prep.json` of the same folder (every dropped id in `dropped.jsonl`), and the counts travel with the dataset
version in its `meta.json`.

When one preparation step drops more than `drop_budget.max_share` of one source's documents (`quality.yaml`), a
warning alert names the source, the step, the top reasons and example ids, and the run's page shows it first;
with `block: true` the night fails instead and makes no version.

Drift is judged by `include/configs/drift.yaml`: beyond its thresholds a warning alert links to the charts, and
the run goes on unless the policy blocks.

**Reports**: every run's page (collection per source, preparation counts, the whylogs profile and drift charts,
the Data Docs) opens from the run's **Reports** tab in this UI, and all versions from **nightshift** in the
navigation. Alerts link to the page. The files are in `$NIGHTSHIFT_HOME/reports/runs/ingest_corpus/<run_id>/`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from nightshift.airflow.common import (
    CHAMPION_ASSET,
    CORPUS_ASSET,
    DEFAULT_ARGS,
    UpstreamFailed,
    current_run,
    fail_fast,
    run_dir,
    run_report,
)
from nightshift.settings import load_settings

SCHEDULE = "0 1 * * *"
SETTINGS = load_settings()
SOURCE_HINT = " (set the `source` param or fix sources.yaml)"


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
            None,
            type=["null", "string"],
            maxLength=2048,
            title="One-off source",
            description="Empty: every source of sources.yaml. Or one source by URI: a folder or file://, an "
            "object store (s3://bucket/docs), a website (https://docs.example.com/), or a table "
            "(sql://<conn_id>/<table>?text=<column>). It must lie under NIGHTSHIFT_SOURCE_ROOTS.",
        ),
        "reason": Param(
            None, type=["null", "string"], maxLength=1000, title="Why this run",
            description="Optional. Carried with the new corpus version to finetune_model, whose report says why "
            "it trained. monitor_model fills it when a failing check starts a retrain.",
        ),
    },
)
def ingest_corpus():
    @task
    def plan_sources() -> list[dict]:
        from nightshift.airflow.run_lock import claim_run
        from nightshift.pipelines.housekeeping import prune_work_dirs
        from nightshift.pipelines.ingest import plan_sources as plan
        from nightshift.prep.recipe import PrepRecipe

        context = get_current_context()
        claim_run(SETTINGS, context)
        here = run_dir(SETTINGS, context)
        prune_work_dirs(here.parent, SETTINGS.retention_days, keep=here)
        with fail_fast(FileNotFoundError, NotADirectoryError, ValueError, suffix=SOURCE_HINT):
            # the recipe is read now so that a source naming a missing profile fails before the crawl
            profiles = PrepRecipe.load(SETTINGS.prep_recipe).profiles
            return plan(context["params"]["source"], SETTINGS.sources_file, SETTINGS.source_roots, here, profiles)

    @task(map_index_template="{{ source_name }}")
    def collect_source(spec: dict) -> dict:
        from nightshift.airflow.connections import sql_engine
        from nightshift.pipelines.ingest import collect_source as collect

        context = get_current_context()
        context["source_name"] = spec["name"]  # the mapped task's label in the grid
        with fail_fast(FileNotFoundError, NotADirectoryError, ValueError, prefix=f"source {spec['name']}: "):
            return collect(spec, run_dir(SETTINGS, context), SETTINGS.home / "sources", sql_engine)

    @task(trigger_rule="all_done")  # runs when some sources failed; decides whether the night is usable
    def merge_sources() -> dict:
        from nightshift.pipelines.ingest import SourcesUnusable, planned_sources
        from nightshift.pipelines.ingest import merge_sources as merge
        from nightshift.quality.suite import QualityPolicy

        context = get_current_context()
        here = run_dir(SETTINGS, context)
        specs = planned_sources(here)
        if specs is None:
            raise UpstreamFailed("plan_sources did not finish: nothing to merge")
        with fail_fast(ValueError):  # a broken quality.yaml does not mend itself on retry
            policy = QualityPolicy.load()
        with fail_fast(SourcesUnusable):
            return merge(here, specs, policy.min_source_share, run_report(SETTINGS, context))

    @task(multiple_outputs=False)
    def prepare_corpus(collected: dict) -> dict:
        from nightshift.pipelines.ingest import prepare_corpus as prepare
        from nightshift.prep.recipe import PrepRecipe

        cache = SETTINGS.cache_dir / "prep" / "outcomes.sqlite"
        context = get_current_context()
        # A broken prep.yaml, or a source naming a profile the recipe lacks: no retry mends it.
        with fail_fast(ValueError):
            recipe = PrepRecipe.load(SETTINGS.prep_recipe)
            return prepare(run_dir(SETTINGS, context), recipe, cache, SETTINGS.retention_days,
                           run_report(SETTINGS, context))

    @task(multiple_outputs=False)
    def check_drop_budget() -> dict:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.pipelines.ingest import DropBudgetExceeded, drop_budget, drop_budget_alert
        from nightshift.quality.suite import QualityPolicy

        context = get_current_context()
        report = run_report(SETTINGS, context)
        with fail_fast(ValueError):  # a broken quality.yaml does not mend itself on retry
            budget = QualityPolicy.load().drop_budget
        with fail_fast(DropBudgetExceeded):  # the failure's alert carries the same summary
            verdict = drop_budget(run_dir(SETTINGS, context), budget, report)
        if alert := drop_budget_alert(verdict, report, context["ti"].task_id):
            send_alert(alert)
        return verdict

    @task(multiple_outputs=False, inlets=[CHAMPION_ASSET])
    def profile_corpus(stats: dict) -> dict:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.alerts.channels import Alert
        from nightshift.monitoring.drift import DriftPolicy
        from nightshift.pipelines.incidents import as_incident
        from nightshift.pipelines.ingest import DriftBlocked, drift_alert
        from nightshift.pipelines.ingest import profile_corpus as profile

        context = get_current_context()
        report = run_report(SETTINGS, context)
        promotions = [event.extra or {} for event in context["inlet_events"][CHAMPION_ASSET]]
        champion_data = next((e["dataset_version"] for e in reversed(promotions) if e.get("dataset_version")), None)
        with fail_fast(ValueError):  # a broken drift.yaml does not mend itself on retry
            policy = DriftPolicy.load(SETTINGS.drift_policy)
        with fail_fast(DriftBlocked):
            drift = profile(run_dir(SETTINGS, context), SETTINGS, policy, report, champion_data)
        # An incident: alerted when the corpus starts drifting, reminded while it keeps drifting, resolved after.
        as_incident(SETTINGS, "corpus_drift", "corpus", drift_alert(drift, report, context["ti"].task_id),
                    Alert("corpus drift", "", dag_id=report.dag_id, run_id=report.run_id,
                          task_id=context["ti"].task_id, report_url=report.url),
                    f"{current_run(SETTINGS, context).key}/profile_corpus", send_alert)
        return drift

    @task
    def validate_corpus(stats: dict) -> dict:
        from nightshift.pipelines.ingest import QualityGateFailed, validate
        from nightshift.quality.suite import QualityPolicy

        context = get_current_context()
        with fail_fast(ValueError):  # a broken quality.yaml does not mend itself on retry
            policy = QualityPolicy.load()
        with fail_fast(QualityGateFailed):  # nor does data: fail now, alert, and create no dataset version
            return validate(run_dir(SETTINGS, context), policy, stats, run_report(SETTINGS, context))

    @task
    def version_dataset(collected: dict, stats: dict, drift: dict, quality: dict) -> dict:
        from nightshift.pipelines.ingest import version

        context = get_current_context()
        return version(run_dir(SETTINGS, context), SETTINGS, stats, collected["source"], drift,
                       run_report(SETTINGS, context)).to_dict()

    @task
    def index_corpus(dataset: dict) -> dict:
        from nightshift.pipelines.ingest import index_corpus as index
        from nightshift.records import DatasetVersion

        context = get_current_context()
        with fail_fast(ValueError):  # a broken retrieval.yaml or vector store URL does not mend itself on retry
            built = index(run_dir(SETTINGS, context), SETTINGS, DatasetVersion.from_dict(dataset),
                          run_report(SETTINGS, context))
        if built.get("skipped"):
            print(f"not indexed: {built['skipped']}")
        return built

    @task(inlets=[CORPUS_ASSET], outlets=[CORPUS_ASSET])
    def publish_dataset(dataset: dict, index: dict) -> dict:
        from nightshift.pipelines.ingest import needs_publishing
        from nightshift.provenance import printable_line
        from nightshift.records import DatasetVersion

        context = get_current_context()
        published = [event.extra for event in context["inlet_events"][CORPUS_ASSET]]
        if not needs_publishing(DatasetVersion.from_dict(dataset), published):
            raise AirflowSkipException(f"corpus unchanged: {dataset['tag']} was published already")
        reason = printable_line(context["params"].get("reason"))  # it is shown on report pages
        context["outlet_events"][CORPUS_ASSET].extra = {
            "dataset_version": dataset["tag"], "rev": dataset["rev"], "md5": dataset["md5"],
            "documents": dataset["documents"],
            **({"index": {"chunks": index["chunks"], "engine": index["engine"]}} if index.get("engine") else {}),
            **({"reason": reason} if reason else {}),
        }
        return dataset

    specs = plan_sources()
    collected = collect_source.expand(spec=specs)
    merged = merge_sources()
    collected >> merged
    stats = prepare_corpus(merged)
    # A step that ate a source is told (or, when the budget blocks, stops the night) before the rest goes on.
    budget = check_drop_budget()
    stats >> budget
    # Profiling and validation read the prepared corpus independently: they run side by side.
    drift = profile_corpus(stats)
    quality = validate_corpus(stats)
    budget >> [drift, quality]
    # The version is announced (and trained on) once its index exists: a model's dataset version names its index.
    dataset = version_dataset(merged, stats, drift, quality)
    publish_dataset(dataset, index_corpus(dataset))


ingest_corpus()
