"""
# monitor_model

Watch the models in production hour by hour: read the endpoint's request log for the hour that just ended,
measure every answer (no text kept), compare the hour with the week before it, and turn what fails into
incidents: one alert when a check starts failing, a reminder only after `incidents.repeat_hours`, and a
"resolved" message when it passes again.

| task | does |
|---|---|
| `measure_hour` | per answer: prompt and answer length, language (py3langid), refusal, the scrubber's finds |
|  | (counts), answer-to-prompt similarity (all-MiniLM-L6-v2), latency, tokens, finish; per version: traffic, |
|  | p50/p95 latency, error and refusal rates, a whylogs profile under `$NIGHTSHIFT_HOME/monitoring/hours/`; |
|  | prompt drift (a classifier tells this hour's prompts from the reference's: ROC AUC); live ratings of the |
|  | champion and the champion before it, with Wilson intervals |
| `judge_hour` | the checks of `include/configs/monitoring.yaml`: errors per version, prompt drift, the champion |
|  | rated worse than the one before (with the way back: `rollback_model`) |
| `raise_incidents` | records each check in the incident table; sends what opens, repeats or resolves, once even |
|  | when retried; every alert links the Monitoring page |
| `decide_retrain` | a failing check of `retrain.checks` starts a retrain, at most one per |
|  | `retrain.min_hours_between`; skips what follows otherwise, and says why |
| `start_ingest` | triggers `ingest_corpus` with the reason: its new corpus version (fresh documents, approved |
|  | feedback), if anything changed, trains the next candidate, and finetune_model's report says why it ran |
| `publish_page` | the **Monitoring** page of the nightshift view: per version and hour, traffic, latency, errors, |
|  | negative feedback with intervals, prompt drift, and the incidents still open |

**Params**: `hour_end` judges another hour (ISO 8601, e.g. `2026-12-01T10:00:00Z`: the hour before it);
empty: the hour that ended before this run's data interval ended.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

from nightshift.airflow.common import DEFAULT_ARGS, current_run, fail_fast
from nightshift.settings import load_settings

SETTINGS = load_settings()


def _policy():
    from nightshift.monitoring.policy import MonitoringPolicy

    with fail_fast(ValueError):  # a broken monitoring.yaml does not mend itself on retry
        return MonitoringPolicy.load(SETTINGS.monitoring_policy)


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["nightshift", "monitoring"],
    doc_md=__doc__,
    params={
        "hour_end": Param(
            None, type=["null", "string"], format="date-time", title="End of the hour to judge",
            description="ISO 8601 time, floored to the hour; the hour before it is judged. Empty: the hour "
            "that ended when this run's data interval ended (or now, for a run without one).",
        ),
    },
)
def monitor_model():
    @task
    def measure_hour() -> dict:
        from datetime import UTC

        from nightshift.pipelines import monitor

        context = get_current_context()
        requested = context["params"].get("hour_end")
        with fail_fast(ValueError, prefix="hour_end: "):
            end = (datetime.fromisoformat(requested.replace("Z", "+00:00")) if requested
                   else context.get("data_interval_end") or datetime.now(UTC))
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        start, end = monitor.hour_bounds(end)
        return monitor.measure_hour(SETTINGS, _policy(), start, end, monitor.champion_versions(SETTINGS))

    @task
    def judge_hour(summary: dict) -> list[dict]:
        import dataclasses

        from nightshift.pipelines import monitor

        checks = monitor.judge(summary, _policy(), monitor.rollback_link(SETTINGS))
        for check in checks:
            print(f"{check.check} {check.subject}: {'FAILING' if check.failing else 'ok'}")
        return [dataclasses.asdict(c) for c in checks]

    @task
    def raise_incidents(checks: list[dict]) -> list[dict]:
        from nightshift.airflow.notifiers import send_alert
        from nightshift.alerts.channels import Alert
        from nightshift.alerts.incidents import CheckResult
        from nightshift.pipelines import monitor

        run = current_run(SETTINGS)

        def send(notice) -> None:
            send_alert(Alert(title=notice.title, message=notice.message, severity=notice.severity,
                             dag_id=run.dag_id, run_id=run.run_id, task_id="raise_incidents",
                             report_url=monitor.page_url(SETTINGS),
                             details={"incident": notice.fingerprint, "kind": notice.kind, **notice.details}))

        return monitor.raise_incidents(SETTINGS, _policy(), [CheckResult(**c) for c in checks], run.key, send)

    @task
    def publish_page(_sent: list[dict]) -> str:
        from nightshift.pipelines import monitor

        return str(monitor.publish_page(SETTINGS, _policy()))

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def decide_retrain(summary: dict, checks: list[dict]) -> dict | bool:
        from nightshift.alerts.incidents import CheckResult
        from nightshift.pipelines import monitor

        decision = monitor.decide_retrain(SETTINGS, _policy(), [CheckResult(**c) for c in checks], summary["end"],
                                          current_run(SETTINGS).key)
        print(("starting a retrain: " if decision["start"] else "no retrain: ") + decision["why"])
        return decision if decision["start"] else False

    summary = measure_hour()
    checks = judge_hour(summary)
    publish_page(raise_incidents(checks))
    retrain = decide_retrain(summary, checks)
    retrain >> TriggerDagRunOperator(
        task_id="start_ingest", trigger_dag_id="ingest_corpus",
        trigger_run_id="{{ ti.xcom_pull(task_ids='decide_retrain')['run_id'] }}",
        conf={"reason": "{{ ti.xcom_pull(task_ids='decide_retrain')['why'] }}"},
        skip_when_already_exists=True,  # a retried task (or the same hour judged again) starts one run
    )


monitor_model()
