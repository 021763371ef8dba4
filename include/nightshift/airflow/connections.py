"""Airflow connections, read inside a task (through the Task SDK) or outside one (the CLI, the endpoint)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def in_task() -> bool:
    """Return whether this code runs inside an Airflow task (where the Task SDK's supervisor answers lookups)."""
    from airflow.sdk.execution_time import task_runner

    return hasattr(task_runner, "SUPERVISOR_COMMS")


def get_connection(conn_id: str):
    """Return an Airflow connection; raise AirflowNotFoundException when it is not defined anywhere."""
    if in_task():
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    # Outside a task: environment variables, secrets backends, then the metadata DB.
    from airflow.models.connection import Connection

    return Connection.get_connection_from_secrets(conn_id)


def api_key_hashes(conn_id: str) -> dict[str, str]:
    """Return ``{hash: label}`` of the API keys a connection holds (its password, or extra ``api_keys``).

    A connection that does not exist holds no keys; one that holds something other than ``ns-`` keys or
    ``sha256:`` hashes is an error that names the connection, never its content.
    """
    from airflow.exceptions import AirflowNotFoundException

    from nightshift.serving.keys import hashes_of

    try:
        conn = get_connection(conn_id)
    except AirflowNotFoundException:
        return {}
    except Exception as exc:  # the metadata DB may be unreachable from a serving pod
        log.warning("could not read the connection %s (%s); it adds no API keys", conn_id, type(exc).__name__)
        return {}
    values = list(conn.extra_dejson.get("api_keys") or [])
    if conn.password:
        values.append(conn.password)
    return {h: f"conn:{conn_id}" for h in hashes_of(values, f"connection {conn_id}")}


def sql_engine(conn_id: str):
    """Return a SQLAlchemy engine for an Airflow connection, through its common-sql provider hook."""
    hook = get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise ValueError(f"connection {conn_id!r} is not a SQL database (its hook is {type(hook).__name__})")
    return hook.get_sqlalchemy_engine()


def judge_endpoint(conn_id: str, model: str | None = None):
    """Return (JudgeEndpoint, "") for the judge's connection, or (None, why) when it is not defined
    (``openai_endpoint``'s rules)."""
    return openai_endpoint(conn_id, model, "judge")


def openai_endpoint(conn_id: str, model: str | None = None, what: str = "API"):
    """Return (JudgeEndpoint, "") for an OpenAI-compatible endpoint's connection, or (None, why) when it is not
    defined.

    The connection's host is the endpoint's base URL (``https://judge.example.com/v1``), or a bare host with
    schema (http/https), port and extra ``path`` (default ``/v1``); the password is the API key; the model is
    ``model`` (evaluation.yaml) else the extra ``model``.
    """
    from airflow.exceptions import AirflowNotFoundException

    from nightshift.evaluation.judge import JudgeEndpoint

    try:
        conn = get_connection(conn_id)
    except AirflowNotFoundException:
        return None, f"no Airflow connection {conn_id!r}"
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(f"the {what} connection {conn_id!r} has no host: set it to the endpoint's base URL")
    if "://" in host:
        base_url = host.rstrip("/")
    else:
        scheme = conn.schema if conn.schema in ("http", "https") else "http"
        port = f":{conn.port}" if conn.port else ""
        base_url = f"{scheme}://{host}{port}{extra.get('path', '/v1')}".rstrip("/")
    name = model or extra.get("model")
    if not isinstance(name, str) or not name.strip():
        where = "judge.model in evaluation.yaml" if what == "judge" else "its model in foundation.yaml"
        raise ValueError(f"the {what} connection {conn_id!r} names no model: set its extra to "
                         f'{{"model": "<model>"}} or {where}')
    return JudgeEndpoint(base_url=base_url, model=name.strip(), api_key=conn.password or "unused"), ""


def s3_remote_config(conn_id: str) -> dict[str, str]:
    """Return DVC's S3 remote options (``endpointurl``, keys, ``region``) from an ``aws`` Airflow connection.

    The login and password are the access key id and secret; extra ``endpoint_url`` names an S3-compatible
    service (MinIO, Ceph, moto), extra ``region_name`` its region. Without the connection DVC uses its own
    credential chain (an instance role, AWS_* variables, ~/.aws), as on a cluster node with an IAM role.
    """
    from airflow.exceptions import AirflowNotFoundException

    try:
        conn = get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("no Airflow connection %s: DVC reaches S3 with its own credential chain", conn_id)
        return {}
    extra = conn.extra_dejson or {}
    config = {"endpointurl": extra.get("endpoint_url") or (conn.host or ""),
              "access_key_id": conn.login or "", "secret_access_key": conn.password or "",
              "region": extra.get("region_name") or ""}
    return {key: str(value) for key, value in config.items() if value}
