"""
# harvest_feedback

Turn what users said about the model's answers into training data, with a person in the loop: answers a rater
corrected (the correction becomes the answer) and answers rated well (`include/configs/monitoring.yaml`,
`harvest:`) are gathered into a batch; a data engineer approves or rejects the batch right here, in the
**Required actions** of this run, seeing its counts and a few examples (scrubbed when logged); an approved
batch is read by the `feedback` source of `sources.yaml` on the next `ingest_corpus` night, goes through the
whole preparation recipe like any other source, and keeps its provenance (answer id, model version, rating,
who approved it) in the corpus.

| task | does |
|---|---|
| `collect_candidates` | the next batch of rated answers not offered before (skipped when there is none) |
| `approve_batch` | waits for a person: **Approve** or **Reject**; unanswered after `response_timeout_hours`, rejected |
| `apply_decision` | moves the batch to `approved/` or `rejected/` under `$NIGHTSHIFT_HOME/feedback/` (who, when) |
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from nightshift.airflow.common import DEFAULT_ARGS, current_run, fail_fast
from nightshift.monitoring.policy import MonitoringPolicy
from nightshift.settings import load_settings

SETTINGS = load_settings()
try:
    HARVEST = MonitoringPolicy.load(SETTINGS.monitoring_policy).harvest
    POLICY_ERROR = None
except ValueError as exc:  # the DAG still parses; collect_candidates fails with the message
    HARVEST, POLICY_ERROR = MonitoringPolicy().harvest, str(exc)
OPTIONS = ["Approve", "Reject"]


@dag(
    schedule="30 0 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "monitoring", "data"],
    doc_md=__doc__,
)
def harvest_feedback():
    @task
    def collect_candidates() -> dict:
        from nightshift.pipelines import harvest

        if POLICY_ERROR:
            with fail_fast(ValueError):  # a broken monitoring.yaml does not mend itself on retry
                raise ValueError(POLICY_ERROR)
        run = current_run(SETTINGS)
        with fail_fast(ValueError):  # the request log switched off does not mend itself on retry
            summary = harvest.collect_candidates(SETTINGS, HARVEST, run.run_id)
        if summary["state"] != "pending" or not summary["candidates"]:
            raise AirflowSkipException(f"batch {summary['batch']}: {summary['candidates']} candidates, "
                                       f"{summary['state']}: nothing to decide")
        return {**summary, "body": harvest.approval_body(summary)}

    candidates = collect_candidates()
    approve = HITLOperator(
        task_id="approve_batch",
        subject="Feedback batch {{ ti.xcom_pull(task_ids='collect_candidates')['batch'] }}: "
                "{{ ti.xcom_pull(task_ids='collect_candidates')['candidates'] }} candidate training documents",
        body="{{ ti.xcom_pull(task_ids='collect_candidates')['body'] }}",
        options=OPTIONS,
        defaults=["Reject"],
        response_timeout=timedelta(hours=HARVEST.response_timeout_hours),
    )

    @task
    def apply_decision(summary: dict, answer: dict) -> dict:
        from nightshift.airflow.hitl import answer_of
        from nightshift.pipelines import harvest

        said = answer_of(answer)
        by, at = said["by"], said["at"] or get_current_context()["ts"]
        decided = harvest.decide(SETTINGS, summary["batch"], said["approved"], by, at)
        print(f"batch {decided['batch']}: {decided['state']} by {by} ({decided['candidates']} documents)")
        return {k: v for k, v in decided.items() if k != "examples"}

    candidates >> approve
    apply_decision(candidates, approve.output)


harvest_feedback()
