"""The local installation: its environment, set-up, settings file, foundation model, and everything started at
once (``nightshift up``)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from nightshift.cli.keys import ensure_local_key
from nightshift.cli.stack import prepare_metadata, python_env
from nightshift.cli.tools import tool_path
from nightshift.environment import configure_environment, write_private
from nightshift.settings import DEFAULT_FOUNDATION_MODEL, Settings, repo_root

log = logging.getLogger("nightshift")

ADMIN_USER = "admin"


def cmd_env(settings: Settings, _args) -> int:
    for key, value in configure_environment(settings).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_setup(settings: Settings, args) -> int:
    started = time.monotonic()
    env = configure_environment(settings)
    admin_password(settings)
    log.info("migrating the Airflow metadata DB at %s", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    prepare_metadata(settings)
    ensure_local_key(settings)
    from nightshift.stores import registry_for

    registry_for(settings).client.search_experiments(max_results=1)  # creates the MLflow store
    register_prompts(settings)
    _make_private(settings)
    if args.model:
        from nightshift.training.foundation import import_foundation_model

        import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    log.info("set-up done in %.0fs; state lives in %s", time.monotonic() - started, settings.home)
    return 0


def register_prompts(settings: Settings) -> None:
    """Register the prompt templates of include/configs/prompts whose text is new (a version each); releasing one
    is evaluate_prompt's job."""
    import getpass

    from nightshift.prompts.template import source_templates
    from nightshift.stores import prompt_registry_for

    registry = prompt_registry_for(settings)
    for template in source_templates(settings.prompts_dir).values():
        version, new = registry.register(template, "from the checkout's include/configs/prompts", getpass.getuser())
        if new:
            log.info("registered prompt %s (release it with the evaluate_prompt DAG)", version.label)


def cmd_apply_settings(settings: Settings, args) -> int:
    """Apply airflow_settings.yaml to the metadata DB, waiting (up to --wait s) for its migrations first."""
    from nightshift.airflow.settings_file import apply_settings_file

    configure_environment(settings)
    path = Path(args.file or os.environ.get("NIGHTSHIFT_SETTINGS_FILE") or
                ((repo_root() or Path("/opt/nightshift")) / "airflow_settings.yaml"))
    if not path.is_file():
        raise SystemExit(f"no settings file at {path}: pass --file or set NIGHTSHIFT_SETTINGS_FILE")
    if args.wait:
        subprocess.run([tool_path("airflow"), "db", "check-migrations", "--migration-wait-timeout", str(args.wait)],
                       check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    applied = apply_settings_file(path)
    log.info("%s: %d changes", path, applied.changed)
    return 0


def cmd_import_model(settings: Settings, _args) -> int:
    from nightshift.training.foundation import import_foundation_model

    configure_environment(settings)
    import_foundation_model(settings.models_dir / DEFAULT_FOUNDATION_MODEL)
    return 0


def cmd_up(settings: Settings, args) -> int:
    if settings.profile != "embedded":
        return _up_production(settings, args)
    from nightshift.supervisor import Service, Supervisor

    configure_environment(settings)
    password_file = admin_password(settings)
    ensure_local_key(settings)
    _make_private(settings)
    env = python_env()  # standalone starts its components as `airflow ...` subprocesses: they must find this CLI
    services = [
        Service("airflow", [tool_path("airflow"), "standalone"], env),
        Service("endpoint", [sys.executable, "-m", "nightshift.cli", "serve", "--port", str(args.serve_port)], env),
    ]
    _print_addresses(settings, args, password_file)
    return Supervisor(services).run()


def _up_production(settings: Settings, args) -> int:
    """Airflow's components as processes of their own with Celery workers, and the endpoint, on the engines of
    the production profile (started here first on production-local); supervised until stopped."""
    from nightshift.cli.stack import airflow_services, celery_workers, engines_for
    from nightshift.supervisor import Service, Supervisor

    with engines_for(settings) as (settings, spare):
        configure_environment(settings)
        password_file = admin_password(settings)
        ensure_local_key(settings)
        _make_private(settings)
        prepare_metadata(settings)
        env = python_env()
        logs = settings.home / "logs" / "stack"
        print(f"Airflow's components and the Celery workers log to {logs}/", flush=True)
        services = [*airflow_services(env, celery_workers(), logs),
                    Service("endpoint", [sys.executable, "-m", "nightshift.cli", "serve", "--port",
                                         str(args.serve_port)], env)]
        _print_addresses(settings, args, password_file)
        return Supervisor(services, spare=spare).run()


def _print_addresses(settings: Settings, args, password_file: Path) -> None:
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
    if settings.profile != "embedded":
        print(f"Profile:     {settings.profile}: Airflow on {os.environ.get('AIRFLOW__CORE__EXECUTOR')}, MLflow at "
              f"{settings.tracking_uri}, DVC remote {settings.dvc_remote}\n", flush=True)


def admin_password(settings: Settings) -> Path:
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
