"""``nightshift``: set up the local installation, run one cycle, serve the champion, start everything.

    nightshift setup [--model]     metadata DB, airflow_settings.yaml, DVC data repo (and the foundation model)
    nightshift apply-settings      airflow_settings.yaml into the metadata DB (what the Airflow image runs at start)
    nightshift cycle               ingest_corpus, then finetune_model on its dataset version, then a summary
    nightshift serve               the OpenAI-compatible endpoint on http://127.0.0.1:8000/v1
    nightshift up                  Airflow (standalone) and the endpoint together, supervised
    nightshift keys create|list|revoke   API keys of the endpoint
    nightshift env                 the environment variables, as `export` lines for a shell
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nightshift.settings import (
    DEFAULT_FOUNDATION_MODEL,
    Settings,
    ensure_airflow_config,
    load_settings,
    repo_root,
    runtime_env,
    write_private,
)

log = logging.getLogger("nightshift")

SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000
ADMIN_USER = "admin"
# State files (metadata DB, MLflow store, keys, passwords) are for this user only.
PRIVATE_UMASK = 0o077


def configure_environment(settings: Settings) -> dict[str, str]:
    """Export the runtime environment (explicit variables win) before anything imports Airflow."""
    ensure_airflow_config(settings)
    for key, value in runtime_env(settings).items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in runtime_env(settings)}


def cmd_env(settings: Settings, _args) -> int:
    for key, value in configure_environment(settings).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_setup(settings: Settings, args) -> int:
    from nightshift.pipelines.ingest import dataset_repository

    started = time.monotonic()
    env = configure_environment(settings)
    _admin_password(settings)
    log.info("migrating the Airflow metadata DB at %s", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    subprocess.run([_bin("airflow"), "db", "migrate"], check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    from nightshift.airflow.settings_file import apply_settings_file

    root = repo_root()
    if root:
        applied = apply_settings_file(root / "airflow_settings.yaml")
        log.info("airflow_settings.yaml: %d changes", applied.changed)
    dataset_repository(settings).ensure()
    _ensure_local_key(settings)
    from nightshift.pipelines.finetune import registry_for

    registry_for(settings).client.search_experiments(max_results=1)  # creates the MLflow store
    _make_private(settings)
    if args.model:
        from nightshift.training.foundation import import_foundation_model

        import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    log.info("set-up done in %.0fs; state lives in %s", time.monotonic() - started, settings.home)
    return 0


def cmd_apply_settings(settings: Settings, args) -> int:
    """Apply airflow_settings.yaml to the metadata DB, waiting (up to --wait s) for its migrations first."""
    from nightshift.airflow.settings_file import apply_settings_file

    configure_environment(settings)
    path = Path(args.file or os.environ.get("NIGHTSHIFT_SETTINGS_FILE") or
                ((repo_root() or Path("/opt/nightshift")) / "airflow_settings.yaml"))
    if not path.is_file():
        raise SystemExit(f"no settings file at {path}: pass --file or set NIGHTSHIFT_SETTINGS_FILE")
    if args.wait:
        subprocess.run([_bin("airflow"), "db", "check-migrations", "--migration-wait-timeout", str(args.wait)],
                       check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    applied = apply_settings_file(path)
    log.info("%s: %d changes", path, applied.changed)
    return 0


def cmd_import_model(settings: Settings, _args) -> int:
    from nightshift.training.foundation import import_foundation_model

    configure_environment(settings)
    import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    return 0


def run_dag(dag_id: str, conf: dict[str, Any] | None = None):
    """Run one DAG in this process with ``dag.test()`` and return its DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    root = repo_root()
    bag = DagBag(dag_folder=str(root / "dags" if root else os.environ["AIRFLOW__CORE__DAGS_FOLDER"]))
    if dag_id not in bag.dags:
        raise SystemExit(f"DAG {dag_id} not found; import errors: {bag.import_errors}")
    return bag.dags[dag_id].test(run_conf=conf or {})


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


def cmd_cycle(settings: Settings, args) -> int:
    configure_environment(settings)
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
                  pages, settings.report_url("index.html").removesuffix("reports/index.html")))
    return 0 if str(finetune.state) == "success" else 1


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
            key_file: Path | None = None, pages: dict[str, Path | None] | None = None, ui_page: str = "") -> str:
    """Return the human summary of one cycle."""
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
        "=" * 72,
    ]
    return "\n".join(lines)


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


def cmd_serve(settings: Settings, args) -> int:
    import uvicorn

    from nightshift.pipelines.finetune import registry_for
    from nightshift.serving.app import create_app

    configure_environment(settings)
    keyring = build_keyring(settings)
    if settings.require_api_key and not len(keyring):
        log.warning("no API keys are configured: every /v1 request will get 401; create one with "
                    "`nightshift keys create` or run `nightshift setup`")
    from nightshift.airflow.notifiers import alert_sender
    from nightshift.serving.requestlog import RequestLog

    limits = settings.serving
    request_log = None
    if settings.request_log_url:
        settings.serving_dir.mkdir(parents=True, exist_ok=True)
        request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    app = create_app(
        registry_for(settings), settings.cache_dir / "serving", limits=limits, keyring=keyring,
        require_key=settings.require_api_key, poll_seconds=args.poll_seconds, on_alert=alert_sender("serving"),
        request_log=request_log,
        upstreams=({"champion": settings.serve_upstream, "candidate": settings.serve_upstream_candidate or ""}
                   if settings.serve_upstream else None),
    )
    key_note = (f"API key for local use: {settings.local_key_file}" if settings.local_key_file.is_file()
                else "API keys: `nightshift keys create`")
    print(f"serving {settings.registered_model}@{settings.champion_alias} on http://{args.host}:{args.port}/v1 "
          f"({key_note})", flush=True)
    # Requests in flight are bounded in the application (connections.InFlightMiddleware), not sockets: uvicorn's
    # limit_concurrency counts idle connections too, and would refuse the probes. A connection gets
    # header_timeout_s to send its request's headers (connections.HeaderTimeoutProtocol).
    from nightshift.serving.connections import protocol_class

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=protocol_class(limits.header_timeout_s),
                timeout_graceful_shutdown=10)
    return 0


def build_keyring(settings: Settings):
    """Return the keys the endpoint accepts: the key file, NIGHTSHIFT_API_KEYS and the serving connection."""
    from nightshift.airflow.connections import api_key_hashes
    from nightshift.serving.keys import KeyRing, KeyStore, hashes_of

    fixed = {h: "env" for h in hashes_of(os.environ.get("NIGHTSHIFT_API_KEYS", "").split(","),
                                         "NIGHTSHIFT_API_KEYS")}
    fixed.update(api_key_hashes(settings.serving_conn_id))
    return KeyRing(KeyStore(settings.key_file), fixed)


def _ensure_local_key(settings: Settings) -> None:
    from nightshift.serving.keys import KeyStore, ensure_local_key

    path, created = ensure_local_key(KeyStore(settings.key_file), settings.local_key_file)
    log.info("%s API key for local use: %s (send it as `Authorization: Bearer $(cat %s)`)",
             "created an" if created else "the", path, path)


def cmd_keys(settings: Settings, args) -> int:
    from nightshift.serving.keys import KeyStore

    store = KeyStore(settings.key_file)
    if args.action == "create":
        record, key = store.create(args.name)
        print(f"created key {record.id} ({record.name}); it is shown only this once:\n{key}")
        return 0
    if args.action == "revoke":
        if not args.id:
            raise SystemExit("nightshift keys revoke needs a key id or name (see `nightshift keys list`)")
        revoked = store.revoke(args.id)
        if not revoked:
            print(f"no active key has the id or name {args.id!r}", file=sys.stderr)
            return 1
        for record in revoked:
            print(f"revoked key {record.id} ({record.name}, {record.hint}); the endpoint refuses it within a second")
        return 0
    records = store.records()
    if not records:
        print(f"no keys in {settings.key_file}; create one with `nightshift keys create --name NAME`")
        return 0
    print(f"{'id':<10}{'name':<24}{'key':<16}{'created':<27}revoked")
    for r in records:
        print(f"{r.id:<10}{r.name:<24}{r.hint:<16}{r.created_at:<27}{r.revoked_at or '-'}")
    return 0


def cmd_trace(settings: Settings, args) -> int:
    from nightshift.pipelines.lineage import NotTraceable, trace_answer

    configure_environment(settings)
    try:
        traced = trace_answer(settings, args.response_id[:80])
    except NotTraceable as exc:
        print(f"cannot trace: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(traced, indent=2, default=str))
        return 0
    a, lin = traced["answer"], traced["lineage"]
    print(f"answer    {a['response_id']} at {a['created_at']} ({a['route']}, {a['finish']}, "
          f"{a['prompt_tokens']}+{a['completion_tokens']} tokens, key {a['key_id'] or '-'})")
    print(f"model     {lin['model']['name']} v{lin['model']['version']} ({lin['model']['role']})")
    run = lin["run"]
    print("run       " + (run["missing"] if "missing" in run else
                          f"{run['run_id']} {run['name'] or ''} [{run['status']}] DAG run {run['dag_run'] or '-'}"))
    ds = lin["dataset"]
    print("dataset   " + (f"{ds.get('tag', '')} {ds['missing']}" if "missing" in ds else
                          f"{ds['tag']} @ {ds['rev'][:10]}: {ds['path']} md5 {ds['md5']} ({ds['documents']} documents, "
                          f"{ds['bytes']} bytes)"))
    if a["scrubbed"]:
        print(f"scrubbed  {', '.join(f'{k} x{v}' for k, v in sorted(a['scrubbed'].items()))}")
    for f in a["feedback"]:
        extra = " with a correction" if f["correction"] else ""
        print(f"feedback  {f['created_at']} rating {f['rating']:+d}{extra}")
    return 0


def cmd_fetch_model(settings: Settings, args) -> int:
    """Download the version an alias names into DEST/model (verified), and its number into DEST/VERSION."""
    import shutil

    from nightshift.pipelines.finetune import registry_for

    configure_environment(settings)
    registry = registry_for(settings)
    from mlflow.exceptions import MlflowException

    try:
        mv = registry.client.get_model_version_by_alias(registry.model_name, args.alias)
    except MlflowException:
        print(f"no version of {registry.model_name} carries the alias {args.alias!r}", file=sys.stderr)
        return 1
    record = registry._record(mv)
    dest = Path(args.dest)
    folder = registry.download(record, dest / ".download")
    target = dest / "model"
    staged = dest / "model.partial"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(folder, staged)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    shutil.rmtree(dest / ".download", ignore_errors=True)
    (dest / "VERSION.partial").write_text(f"{record.version}\n")
    (dest / "VERSION.partial").rename(dest / "VERSION")
    print(f"{record.label} ({args.alias}) is in {target}")
    return 0


def cmd_deploy_manifests(settings: Settings, args) -> int:
    import yaml

    from nightshift.serving.deploy import ServingCluster, manifests

    overrides = {k: v for k, v in (("vllm_image", args.vllm_image), ("front_image", args.front_image),
                                   ("gpus_per_engine", args.gpus)) if v}
    docs = manifests(settings, ServingCluster.from_settings(settings, **overrides))
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    if args.out:
        Path(args.out).write_text(text)
        print(f"{len(docs)} manifests written to {args.out}: kubectl apply -f {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_history(settings: Settings, args) -> int:
    from nightshift.pipelines.finetune import registry_for
    from nightshift.registry.history import PromotionHistory, parse_time

    configure_environment(settings)
    registry = registry_for(settings)
    history = PromotionHistory(registry)
    try:
        when = parse_time(args.at) if args.at else None
    except ValueError as exc:
        print(f"--at: {exc}", file=sys.stderr)
        return 2
    moves = history.moves(include_pending=True)
    answer = history.champion_at(when) if when else None
    if args.json:
        print(json.dumps({"model": registry.model_name, "alias": registry.alias,
                          "moves": [m.to_dict() for m in moves],
                          **({"at": when.isoformat(), "champion": answer} if when else {})}, indent=2))
        return 0
    if when is not None:
        if answer["version"] is None:
            print(f"{when.isoformat()}: {registry.model_name} had no champion")
        else:
            since = f"since {answer['since']}" if answer["since"] else "since before the recorded history"
            print(f"{when.isoformat()}: {registry.model_name} v{answer['version']} was champion ({since})")
        return 0
    if not moves:
        print(f"{registry.model_name}@{registry.alias} has never moved")
        return 0
    print(f"{'when (UTC)':<28}{'move':<12}{'kind':<11}{'by':<18}{'DAG run':<44}why")
    for m in moves:
        when_text = m.at or f"{m.requested_at} (pending)"
        move = f"{'v' + str(m.from_version) if m.from_version else '-'} -> v{m.to_version}"
        why = " ".join(m.reason.split())
        print(f"{when_text[:26]:<28}{move:<12}{m.kind:<11}{m.by[:16]:<18}{m.dag_run[:42]:<44}{why[:100]}")
        if m.evaluation.get("report"):
            print(f"{'':<28}evaluation: {m.evaluation['report']}")
    return 0


def cmd_profile(settings: Settings, args) -> int:
    from nightshift.monitoring.profiles import read_profile, summarize
    from nightshift.pipelines.ingest import PROFILE, dataset_repository

    configure_environment(settings)
    try:
        data = dataset_repository(settings).read_companion(args.tag, PROFILE)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    if data is None:
        print(f"{args.tag} was versioned without a profile (before profiles were kept)", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_bytes(data)
        print(f"wrote {args.out} ({len(data)} bytes; whylogs: DatasetProfileView.deserialize)")
    summary = summarize(read_profile(data))
    print(f"{args.tag}: {summary['documents']} documents")
    for name, column in summary["columns"].items():
        if "quantiles" in column and "top" not in column:
            q = column["quantiles"]
            print(f"  {name:<14} mean {column['mean']:10.1f}  median {q['0.5']:10.0f}  p95 {q['0.95']:10.0f}  "
                  f"missing {column['null']}")
        elif column.get("top"):
            top = ", ".join(f"{t['value']} {t['count']}" for t in column["top"][:5])
            print(f"  {name:<14} {top}")
    return 0


def _admin_password(settings: Settings) -> Path:
    """Return the Airflow UI's password file, creating it with a random password (printed once) on first use."""
    import secrets

    path = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    if path.is_file():
        path.chmod(0o600)
        return path
    password = secrets.token_urlsafe(12)
    write_private(path, json.dumps({ADMIN_USER: password}))
    print(f"Airflow UI user {ADMIN_USER!r}, password {password!r} (shown once; it stays in {path})", flush=True)
    return path


def _make_private(settings: Settings) -> None:
    """Restrict the state files that hold secrets or data to this user (0600)."""
    candidates = [settings.airflow_home / "airflow.db", settings.airflow_home / "airflow.cfg",
                  settings.mlflow_dir / "mlflow.db", settings.key_file, settings.local_key_file,
                  settings.airflow_home / "simple_auth_manager_passwords.json.generated"]
    for path in candidates:
        if path.is_file():
            path.chmod(0o600)


def cmd_up(settings: Settings, args) -> int:
    from nightshift.supervisor import Service, Supervisor

    configure_environment(settings)
    password_file = _admin_password(settings)
    _ensure_local_key(settings)
    _make_private(settings)
    env = os.environ.copy()
    # standalone starts its components as `airflow ...` subprocesses: they must find this environment's CLI.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    services = [
        Service("airflow", [_bin("airflow"), "standalone"], env),
        Service("endpoint", [sys.executable, "-m", "nightshift.cli", "serve", "--port", str(args.serve_port)], env),
    ]
    api_port = os.environ.get("AIRFLOW__API__PORT", "8080")
    host = os.environ.get("AIRFLOW__API__HOST", settings.airflow_host)
    print(
        f"\nAirflow UI:  http://{host}:{api_port}  (user {ADMIN_USER}, password in {password_file})\n"
        f"Reports:     http://{host}:{api_port}/nightshift/  (Browse > nightshift; the Reports tab of each run)\n"
        f"Endpoint:    http://127.0.0.1:{args.serve_port}/v1  (serves {settings.registered_model}@champion; "
        "restarted if it dies)\n"
        f"API key:     {settings.local_key_file}  (send it as `Authorization: Bearer <key>`)\n"
        "DAGs start paused: unpause ingest_corpus and finetune_model in the UI for the nightly schedule.\n"
        "Ctrl-C (or SIGTERM) stops everything.\n",
        flush=True,
    )
    return Supervisor(services).run()


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nightshift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment as export lines").set_defaults(func=cmd_env)
    setup = sub.add_parser("setup", help="prepare the local installation (idempotent)")
    setup.add_argument("--model", action="store_true", help=f"also import {DEFAULT_FOUNDATION_MODEL}")
    setup.set_defaults(func=cmd_setup)
    sub.add_parser("import-model", help=f"import {DEFAULT_FOUNDATION_MODEL}").set_defaults(func=cmd_import_model)
    apply = sub.add_parser("apply-settings", help="apply airflow_settings.yaml (connections, pools, variables)")
    apply.add_argument("--file", help="settings file (default: the checkout's, or NIGHTSHIFT_SETTINGS_FILE)")
    apply.add_argument("--wait", type=int, default=0, help="seconds to wait for the metadata DB's migrations")
    apply.set_defaults(func=cmd_apply_settings)
    cycle = sub.add_parser("cycle", help="run ingest_corpus then finetune_model and print a summary")
    cycle.add_argument("--source", help="document store (default: the bundled sample store)")
    cycle.add_argument("--train-steps", type=int, help="override the recipe's training steps")
    cycle.add_argument("--recipe", help="training recipe name, include/configs/training/<name>.yaml "
                       "(default: default)")
    cycle.add_argument("--base-model", help=f"base model (default {DEFAULT_FOUNDATION_MODEL})")
    cycle.set_defaults(func=cmd_cycle)
    serve = sub.add_parser("serve", help="serve the champion behind an OpenAI-compatible API")
    serve.add_argument("--host", default=SERVE_HOST)
    serve.add_argument("--port", type=int, default=SERVE_PORT)
    serve.add_argument("--poll-seconds", type=float, default=5.0, help="how often to look for a new champion")
    serve.set_defaults(func=cmd_serve)
    up = sub.add_parser("up", help="start Airflow standalone and the endpoint")
    up.add_argument("--serve-port", type=int, default=SERVE_PORT)
    up.set_defaults(func=cmd_up)
    keys = sub.add_parser("keys", help="create, list or revoke API keys of the endpoint")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("id", nargs="?", help="revoke: the key's id or name")
    keys.add_argument("--name", default="default", help="create: a name to recognise the key by")
    keys.set_defaults(func=cmd_keys)
    profile = sub.add_parser("profile", help="fetch the whylogs profile of a dataset version and summarise it")
    profile.add_argument("tag", help="dataset version, e.g. corpus-v0003")
    profile.add_argument("--out", type=Path, help="also write the profile (whylogs protobuf) to this file")
    profile.set_defaults(func=cmd_profile)
    history = sub.add_parser("history", help="list the moves of the champion alias; --at: who was champion then")
    history.add_argument("--at", help="an ISO 8601 time, e.g. 2026-12-01T09:30:00Z (no zone: UTC)")
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(func=cmd_history)
    trace = sub.add_parser("trace", help="trace an answer of the endpoint to its model, run, dataset and bytes")
    trace.add_argument("response_id", help="the answer's id (chatcmpl-... or cmpl-...) or its response's "
                       "X-Request-Id")
    trace.add_argument("--json", action="store_true", help="print JSON (with the scrubbed request and answer)")
    trace.set_defaults(func=cmd_trace)
    fetch = sub.add_parser("fetch-model", help="download the version a registry alias names (an engine pod's init)")
    fetch.add_argument("--alias", default="champion", help="champion (default) or candidate")
    fetch.add_argument("--dest", required=True, help="folder: the checkpoint goes to DEST/model, its number to "
                       "DEST/VERSION")
    fetch.set_defaults(func=cmd_fetch_model)
    deploy = sub.add_parser("deploy-manifests", help="Kubernetes manifests of the GPU serving path (vLLM + front)")
    deploy.add_argument("--out", help="write to this file instead of printing")
    deploy.add_argument("--vllm-image", help="vLLM image (default vllm/vllm-openai:v0.33.0)")
    deploy.add_argument("--front-image", help="nightshift-serving image (docker/serving/Dockerfile)")
    deploy.add_argument("--gpus", type=int, help="GPUs per engine (tensor parallel), default 1")
    deploy.set_defaults(func=cmd_deploy_manifests)
    args = parser.parse_args(argv)
    os.umask(PRIVATE_UMASK)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(load_settings(), args)


if __name__ == "__main__":
    sys.exit(main())
