"""One cycle from the command line: ingest_corpus, then finetune_model on its dataset version, then a summary."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nightshift.environment import configure_environment
from nightshift.settings import (
    Settings,
    repo_root,
)


def cmd_cycle(settings: Settings, args) -> int:
    if settings.profile == "embedded":
        configure_environment(settings)
        return cycle(settings, args, run_dag)
    if settings.profile == "production":
        # A deployment's own scheduler and workers run the cycle; nothing is started here.
        configure_environment(settings)
        return cycle(settings, args, lambda dag_id, conf: run_through_scheduler(dag_id, conf, unpause=False))
    # The production profiles: the cycle's runs go through the scheduler to Celery workers, as a nightly run
    # would; the scheduler creates no run of its own meanwhile (no nightly run, no asset-triggered one).
    from nightshift.cli.stack import (
        airflow_services,
        celery_workers,
        engines_for,
        prepare_metadata,
        python_env,
        running_stack,
    )

    # SIGTERM (a killed `make run`) unwinds like Ctrl-C: the stack and the engines are stopped, not orphaned; a
    # second signal while they stop is ignored, or it would cut the stopping short.
    def unwind(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    signal.signal(signal.SIGINT, unwind)
    started = time.monotonic()
    with engines_for(settings) as (settings, spare):
        configure_environment(settings)
        prepare_metadata(settings)
        env = python_env()
        env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
        logs = settings.home / "logs" / "stack"
        with running_stack(airflow_services(env, celery_workers(), logs), spare):
            print(f"{settings.profile} stack up in {time.monotonic() - started:.0f} s (Airflow on "
                  f"{_engine_name(os.environ.get('AIRFLOW__DATABASE__SQL_ALCHEMY_CONN', ''))}, "
                  f"{os.environ.get('AIRFLOW__CORE__EXECUTOR')}, {celery_workers()} workers; logs in {logs})",
                  flush=True)
            return cycle(settings, args, run_through_scheduler)


def _engine_name(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0] or "?"


def cycle(settings: Settings, args, run_dag) -> int:
    """Run ingest_corpus, then finetune_model on its version, with ``run_dag(dag_id, conf)``; print a summary."""
    started = time.monotonic()
    ingest_conf = {"source": args.source} if args.source else {}
    ingest = run_dag("ingest_corpus", ingest_conf)
    ingest_tasks = task_results(ingest)
    ingest_page = _report_page(settings, "ingest_corpus", ingest.run_id)
    if str(ingest.state) != "success":
        print(_timings("ingest_corpus", ingest_tasks))
        print(f"\ningest_corpus {ingest.state}: see the log above; alerts in {settings.home / 'alerts'}")
        if ingest_page:
            print(f"its report (collection, preparation, profile and drift, Data Docs): {_shown(ingest_page)}")
        return 1
    dataset = ingest_tasks["version_dataset"][2]
    conf: dict[str, Any] = {"dataset_version": dataset["tag"]}
    if args.train_steps:
        conf["train_steps"] = args.train_steps
    if args.recipe:
        conf["recipe"] = args.recipe
    if args.base_model:
        conf["base_model"] = args.base_model
    finetune = run_dag("finetune_model", conf)
    finetune_tasks = task_results(finetune)
    print(_timings("ingest_corpus", ingest_tasks))
    print(_timings("finetune_model", finetune_tasks))
    report = finetune_tasks.get("report", (None, 0, None))[2]
    pages = {"ingest_corpus": ingest_page, "finetune_model": _report_page(settings, "finetune_model", finetune.run_id),
             "overview": settings.reports_dir / "index.html"}
    print(summary(ingest_tasks, report, str(finetune.state), time.monotonic() - started, settings.local_key_file,
                  pages, settings.report_url("index.html").removesuffix("reports/index.html"),
                  finetune_tasks.get("compare_retrieval", (None, 0, None))[2]))
    return 0 if str(finetune.state) == "success" else 1


def run_dag(dag_id: str, conf: dict[str, Any] | None = None):
    """Run one DAG in this process with ``dag.test()`` and return its DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    root = repo_root()
    bag = DagBag(dag_folder=str(root / "dags" if root else os.environ["AIRFLOW__CORE__DAGS_FOLDER"]))
    if dag_id not in bag.dags:
        raise SystemExit(f"DAG {dag_id} not found; import errors: {bag.import_errors}")
    return bag.dags[dag_id].test(run_conf=conf or {})


def run_through_scheduler(dag_id: str, conf: dict[str, Any] | None = None, timeout_s: float = 6 * 3600,
                          unpause: bool = True):
    """Trigger one DAG run for the scheduler and its workers, wait for it to end, and return its DagRun.

    ``unpause``: unpause the DAG first (the stack the cycle started creates no run of its own); a deployment's DAG
    stays as its operators left it, and a paused one is refused (its run would wait for ever)."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import func, select, update

    deadline = time.monotonic() + PARSE_TIMEOUT_S
    while True:
        with create_session() as session:
            if session.scalar(select(SerializedDagModel.dag_id).where(SerializedDagModel.dag_id == dag_id)):
                if unpause:
                    session.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=False))
                elif session.scalar(select(DagModel.is_paused).where(DagModel.dag_id == dag_id)):
                    raise SystemExit(f"{dag_id} is paused in this deployment: unpause it in the UI (its schedule "
                                     "starts too), or trigger it there")
                break
        if time.monotonic() > deadline:
            raise SystemExit(f"the DAG processor has not parsed {dag_id} within {PARSE_TIMEOUT_S} s; see its log")
        time.sleep(1)
    run_id = f"cycle__{time.strftime('%Y%m%dT%H%M%S')}__{dag_id}"
    with create_session() as session:
        trigger_dag(dag_id, triggered_by=DagRunTriggeredByType.CLI, run_id=run_id, conf=conf or {}, session=session)
    started, last_note = time.monotonic(), 0.0
    while True:
        with create_session() as session:
            run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
            state = str(run.state)
            if state in ("success", "failed"):
                return run
            if time.monotonic() - last_note >= PROGRESS_EVERY_S:
                counts = dict(session.execute(select(TaskInstance.state, func.count()).where(
                    TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id).group_by(TaskInstance.state)).all())
                print(f"{dag_id} {state} after {time.monotonic() - started:.0f} s: "
                      + ", ".join(f"{n} {s or 'not started'}" for s, n in sorted(counts.items(), key=str)), flush=True)
                last_note = time.monotonic()
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"{dag_id} run {run_id} did not end within {timeout_s:.0f} s")
        time.sleep(2)


PARSE_TIMEOUT_S = 300
PROGRESS_EVERY_S = 30.0


def task_results(dag_run) -> dict[str, Any]:
    """Return ``{task_id: (state, seconds, return value)}`` for every task of a finished run."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    out: dict[str, Any] = {}
    with create_session() as session:
        for ti in dag_run.get_task_instances(session=session):
            value = session.scalars(XComModel.get_many(
                run_id=dag_run.run_id, key="return_value", dag_ids=dag_run.dag_id, task_ids=ti.task_id,
            )).first()
            seconds = (ti.end_date - ti.start_date).total_seconds() if ti.end_date and ti.start_date else 0.0
            result = XComModel.deserialize_value(value) if value is not None else None
            out[ti.task_id] = (str(ti.state), seconds, result)
    return out


def _report_page(settings: Settings, dag_id: str, run_id: str) -> Path | None:
    from nightshift.reports.store import ReportStore

    page = settings.reports_dir / ReportStore.run_path(dag_id, run_id) / "index.html"
    return page if page.is_file() else None


def _timings(dag_id: str, tasks: dict[str, Any]) -> str:
    total = sum(seconds for _, seconds, _ in tasks.values()) or 1.0
    lines = [f"\n{dag_id}: task timings"]
    for task_id, (state, seconds, _) in sorted(tasks.items(), key=lambda kv: -kv[1][1]):
        if seconds:
            lines.append(f"  {task_id:<20} {state:<10} {seconds:7.1f}s {100 * seconds / total:5.1f}%")
    return "\n".join(lines)


def summary(ingest: dict[str, Any], report: dict[str, Any] | None, state: str, seconds: float,
            key_file: Path | None = None, pages: dict[str, Path | None] | None = None, ui_page: str = "",
            retrieval: dict[str, Any] | None = None) -> str:
    """Return the human summary of one cycle (``retrieval``: finetune_model's compare_retrieval, when it ran)."""
    collected = ingest["merge_sources"][2] or {}
    prepared = ingest["prepare_corpus"][2] or {}
    dataset = ingest["version_dataset"][2] or {}
    lines = ["", "=" * 72, "nightshift cycle summary", "=" * 72]
    lines.append(
        f"dataset   {dataset.get('tag')} ({'new' if dataset.get('created') else 'unchanged, no new version'}) "
        f"rev {str(dataset.get('rev'))[:10]} md5 {dataset.get('md5')}"
    )
    sources = collected.get("sources") or {}
    per_source = ", ".join(f"{name}: {report.get('documents')}" for name, report in sources.items())
    lines.append(
        f"          {collected.get('documents')} documents from {len(sources)} source(s) ({per_source}) "
        f"{collected.get('formats')}, {collected.get('skipped')} skipped {collected.get('skip_reasons') or ''}"
    )
    if collected.get("failed"):
        lines.append(f"          FAILED sources (alerted): {', '.join(collected['failed'])}")
    lines.append(
        f"          {prepared.get('documents')} of {prepared.get('documents_in')} kept by prep.yaml, "
        f"{prepared.get('characters')} characters; dropped per step {prepared.get('dropped') or '{}'}"
    )
    lines.append(
        f"          PII scrubbed {prepared.get('pii') or '{}'}; "
        f"evaluation-set overlap {prepared.get('contamination') or '{}'}"
    )
    drift = (ingest.get("profile_corpus") or (None, 0, None))[2] or {}
    if drift:
        against = ", ".join(f"{k} {v}" for k, v in (drift.get("references") or {}).items()) or "no earlier version"
        named = drift.get("drifted") or drift.get("possibly_drifted") or []
        lines.append(f"drift     {drift.get('status')} against {against}" + (f": {', '.join(named)}" if named else ""))
    index = (ingest.get("index_corpus") or (None, 0, None))[2] or {}
    if index.get("skipped"):
        lines.append(f"index     not built: {index['skipped']}")
    elif index:
        lines.append(f"index     {index.get('tag')} ({index.get('engine')}, {index.get('kind')}): "
                     f"{index.get('chunks')} chunks, {index.get('embedded')} embedded now, {index.get('cached')} from "
                     "the cache"
                     + (" (built before)" if index.get("reused") else ""))
    if report is None:
        lines.append(f"finetune_model ended {state} before its report; see the log above")
        return "\n".join(lines + _report_lines(pages, ui_page))
    if report.get("reused"):
        reused = report["reused"]
        lines.append(f"model     {reused['name']} v{reused['version']} already trained on these bytes with this "
                     "recipe: nothing trained, nothing registered")
    else:
        evaluation = report.get("evaluation") or {}
        base = evaluation.get("baseline") or {}
        lines += metric_lines(evaluation.get("comparisons") or [], base.get("model", "champion"),
                              evaluation.get("confidence", 0.95))
        decision = report.get("decision") or {}
        lines.append(f"gate      {'PASSED' if decision.get('passed') else 'REJECTED'}")
        for reason in decision.get("reasons", []):
            lines.append(f"          - {reason}")
        if decision.get("report"):
            lines.append(f"report    {_shown(Path(decision['report']))}  (evaluation report, also in the MLflow run)")
        promoted = report.get("promoted")
        lines.append(f"model     {promoted['name']} v{promoted['version']} is now champion" if promoted
                     else "model     not promoted; the champion stays")
        lines.append(f"mlflow    run {report.get('mlflow_run_id')}")
        lines += retrieval_lines(retrieval)
    champion = report.get("champion")
    lines.append(f"champion  {champion['name']} v{champion['version']} (dataset {champion['dataset_tag']})"
                 if champion else "champion  none yet")
    lines.append(f"took      {seconds / 60:.1f} min")
    lines += _report_lines(pages, ui_page)
    lines += [
        "",
        "serve it:  make serve      (OpenAI-compatible, http://127.0.0.1:8000/v1)",
        "call it:   curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"             -H \"Authorization: Bearer $(cat {_shown(key_file)})\" \\",
        "             -d '{\"model\": \"nightshift-llm\", \"messages\": [{\"role\": \"user\", \"content\": \"What is "
        "nightshift?\"}]}'",
        "grounded:  the same with \"model\": \"nightshift-llm+rag\" (answers cite the corpus; docs/serving.md)",
        "=" * 72,
    ]
    return "\n".join(lines)


def retrieval_lines(retrieval: dict[str, Any] | None) -> list[str]:
    """The comparison of base, fine-tuned, base+RAG and fine-tuned+RAG, one line each."""
    if not retrieval:
        return []
    if retrieval.get("skipped"):
        return [f"retrieval not compared: {retrieval['skipped']}"]
    key = retrieval.get("key_metric", "")
    lines = [f"retrieval {retrieval.get('items')} golden items naming their sources, recall@{retrieval.get('top_k')} "
             f"{float(retrieval.get('recall_at_k') or 0):.2f}; {key} (vs fine-tuned):"]
    def number(value: Any, sign: str = "") -> str:
        return f"{value:{sign}.3f}" if isinstance(value, int | float) else "n/a"

    for v in retrieval.get("variants") or []:
        diff = v.get("vs_finetuned")
        shown = number(v.get("metrics", {}).get(key))
        if diff:
            shown += (f" ({number(diff.get('difference'), '+')} [{number(diff.get('low'), '+')}, "
                      f"{number(diff.get('high'), '+')}])")
        lines.append(f"          {v.get('name'):<16}{shown}")
    lines.append(f"          best: {retrieval.get('best')} ({retrieval.get('best_note')})")
    return lines


def metric_lines(comparisons: list[dict[str, Any]], baseline: str, confidence: float = 0.95) -> list[str]:
    """Return the metric table of a cycle summary: both models, the difference and its interval."""
    head = f"difference [{confidence:.0%} interval]"
    lines = [f"metrics   {'':<22}{'candidate':>10}{baseline[:28]:>30}{head:>34}"]
    for c in comparisons:
        if c.get("unmeasured"):
            lines.append(f"          {c['metric']:<22}{'not measured: ' + c['unmeasured']:>74}")
            continue
        rel = " rel" if c.get("relative") else ""
        from nightshift.records import as_float

        cand, base, diff, low, high = (as_float(c[k]) for k in ("candidate", "baseline", "difference", "low", "high"))
        interval = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]{rel}"
        lines.append(f"          {c['metric']:<22}{cand:>10.3f}{base:>30.3f}{interval:>34}")
    return lines


def _report_lines(pages: dict[str, Path | None] | None, ui_page: str) -> list[str]:
    """Where to look: the report pages on disk, and the nightshift page of the Airflow UI."""
    if not pages:
        return []
    labels = {"ingest_corpus": "ingest run", "finetune_model": "fine-tune run", "overview": "all versions"}
    lines = [""]
    for key, label in labels.items():
        if pages.get(key) and pages[key].is_file():
            lines.append(f"report    {label + ':':<15}{_shown(pages[key])}")
    if ui_page:
        lines.append(f"          in the Airflow UI (make up): {ui_page}  and the Reports tab of each run")
    return lines


def _shown(path: Path | None) -> str:
    """Return a path relative to the working directory when it lies below it (shorter to copy)."""
    if path is None:
        return "var/serving/local.key"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
