"""The environment every process of this installation runs in: the secrets airflow.cfg must hold, the variables
that point Airflow and the libraries at local state, and files only their owner may read. Settings
(nightshift.settings) only parse the environment; this module writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nightshift.settings import Settings, repo_root

MULTIPART_MIN_BYTES = 64 * 1024 * 1024
"""Files at least this large are uploaded to a tracking server's object store in parts (MLflow's default: 500 MB)."""
MULTIPART_CHUNK_BYTES = 32 * 1024 * 1024
"""Size of each part (S3 takes 5 MiB to 5 GiB, at most 10,000 parts)."""


def write_private(path: Path, text: str) -> Path:
    """Write a file readable by its owner only (0600), atomically: a reader sees the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def ensure_airflow_config(settings: Settings) -> Path:
    """Make sure ``$AIRFLOW_HOME/airflow.cfg`` holds this installation's secrets; return the file (mode 0600).

    - ``[core] fernet_key``: Airflow encrypts connection passwords with it. Kept in the file Airflow itself
      reads, a plain ``airflow`` CLI call encrypts with the same key, and the key never travels in the
      environment (where ``nightshift env`` would print it). A key from an older ``fernet.key`` is carried over.
    - ``[api_auth] jwt_secret``: the scheduler signs each task's token with it and the API server checks it.
      Left empty, every Airflow process generates its own, and the API server refuses every task the
      scheduler starts ("Signature verification failed").
    """
    import re
    import secrets

    cfg = settings.airflow_home / "airflow.cfg"
    legacy = settings.airflow_home / "fernet.key"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    text = cfg.read_text() if cfg.is_file() else ""
    changed = False
    if legacy.is_file() or not re.search(r"(?m)^fernet_key\s*=\s*\S+\s*$", text):
        if legacy.is_file():
            key = legacy.read_text().strip()
        else:
            from cryptography.fernet import Fernet

            key = Fernet.generate_key().decode()
        text, changed = _set_option(text, "core", "fernet_key", key), True
    if not re.search(r"(?m)^jwt_secret\s*=\s*\S+\s*$", text):
        text, changed = _set_option(text, "api_auth", "jwt_secret", secrets.token_urlsafe(48)), True
    if changed:
        write_private(cfg, text)
        legacy.unlink(missing_ok=True)
    cfg.chmod(0o600)
    return cfg


def _set_option(text: str, section: str, key: str, value: str) -> str:
    """Return airflow.cfg text with ``key = value`` in ``[section]`` (replacing the key there, if set)."""
    import re

    line = f"{key} = {value}"
    header = re.search(rf"(?m)^\[{re.escape(section)}\]\s*$", text)
    if header is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"[{section}]\n{line}\n"
    body_end = re.search(r"(?m)^\[", text[header.end():])
    end = header.end() + (body_end.start() if body_end else len(text) - header.end())
    body = text[header.end():end]
    if re.search(rf"(?m)^{re.escape(key)}\s*=.*$", body):
        body = re.sub(rf"(?m)^{re.escape(key)}\s*=.*$", line, body, count=1)
    else:
        body = f"\n{line}" + body
    return text[:header.end()] + body + text[end:]


def runtime_env(settings: Settings) -> dict[str, str]:
    """Return the environment variables that point Airflow and the libraries at local state."""
    root = repo_root()
    api_port = os.environ.get("AIRFLOW__API__PORT", "8080")
    env = {
        "NIGHTSHIFT_HOME": str(settings.home),
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{settings.airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor starts one worker process per slot: size both to the machine, not Airflow's default 32.
        "AIRFLOW__CORE__PARALLELISM": str(settings.airflow_parallelism),
        # The UI and API listen on loopback unless NIGHTSHIFT_AIRFLOW_HOST says otherwise.
        "AIRFLOW__API__HOST": settings.airflow_host,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        # Celery hands a task to another worker when it has not been acknowledged for this long: longer than
        # the longest task (training), or a training run would be started a second time beside the first.
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": str(settings.train_timeout_s + 3600),
        # Celery workers load the tasks' heavy libraries once, before they fork tasks (airflow/celery_config.py).
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "nightshift.airflow.celery_config.CELERY_CONFIG",
        # Lineage of every task (OpenLineage provider), with the inputs and outputs nightshift.airflow.lineage reads
        # from the tasks' records; to a file here unless [openlineage] config_conn_id names a connection.
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({
            "type": "transform", "transformer_class": "nightshift.airflow.lineage.ConfRedactor",
            "transport": {"type": "file", "append": True,
                          "log_file_path": str(settings.home / "lineage" / "events.jsonl")}}),
        "AIRFLOW__OPENLINEAGE__EXTRACTORS": "nightshift.airflow.lineage.TaskRecordExtractor",
        # Emit from a bounded thread, not a fork of the task's process: a fork of a process that holds a model and
        # a dozen threads can hang until the timeout, once per task event (and dag.test() runs every task in one).
        "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "nightshift",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GX_ANALYTICS_ENABLED": "False",
        "WHYLOGS_NO_ANALYTICS": "True",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
    }
    if settings.tracking_uri.startswith(("http://", "https://")):
        # A tracking server with proxied artifacts: large files (checkpoint shards) go to its object store in
        # parts, through URLs the server signs, instead of one request it would have to stream through itself.
        env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] = "true"
        env["MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE"] = str(MULTIPART_MIN_BYTES)
        env["MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE"] = str(MULTIPART_CHUNK_BYTES)
    if root:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(root / "dags")
        env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(root / "plugins")
    return env


def configure_environment(settings: Settings) -> dict[str, str]:
    """Export the runtime environment (explicit variables win) before anything imports Airflow."""
    ensure_airflow_config(settings)
    (settings.home / "lineage").mkdir(parents=True, exist_ok=True)  # the file transport does not create folders
    for key, value in runtime_env(settings).items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in runtime_env(settings)}
