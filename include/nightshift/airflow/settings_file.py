"""Apply an Astro-CLI ``airflow_settings.yaml`` (connections, variables, pools) to the metadata DB.

Same file format as ``astro dev start`` reads, applied without the Astro CLI. Applying a file twice changes
nothing: every entry is created or updated in place, never duplicated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONNECTION_FIELDS = {
    "conn_id", "conn_type", "conn_host", "conn_schema", "conn_login", "conn_password", "conn_port", "conn_uri",
    "conn_extra", "conn_description",
}


@dataclass
class AppliedSettings:
    connections: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    changed: int = 0


def read_settings_file(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Return the ``airflow`` section of a settings file, checked for the keys Astro understands."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    section = data.get("airflow") or {}
    out = {key: list(section.get(key) or []) for key in ("connections", "variables", "pools")}
    for conn in out["connections"]:
        unknown = set(conn) - CONNECTION_FIELDS
        if "conn_id" not in conn or unknown:
            raise ValueError(
                f"{path}: connection {conn.get('conn_id')!r} needs conn_id; unknown keys {sorted(unknown)}"
            )
    for var in out["variables"]:
        if "variable_name" not in var:
            raise ValueError(f"{path}: every variable needs variable_name")
    for pool in out["pools"]:
        if "pool_name" not in pool or not isinstance(pool.get("pool_slot"), int):
            raise ValueError(f"{path}: every pool needs pool_name and an integer pool_slot")
    return out


def apply_settings_file(path: Path) -> AppliedSettings:
    """Create or update the connections, variables and pools of a settings file; return what it holds."""
    from airflow.models import Connection, Pool, Variable
    from airflow.utils.session import create_session

    spec = read_settings_file(path)
    applied = AppliedSettings()
    with create_session() as session:
        for item in spec["connections"]:
            wanted = _connection(item)
            current = session.query(Connection).filter(Connection.conn_id == wanted.conn_id).one_or_none()
            if current is None:
                session.add(wanted)
                applied.changed += 1
            else:
                for attr in ("conn_type", "host", "schema", "login", "port", "description"):
                    if getattr(current, attr) != getattr(wanted, attr):
                        setattr(current, attr, getattr(wanted, attr))
                        applied.changed += 1
                if current.password != wanted.password:
                    current.set_password(wanted.password)
                    applied.changed += 1
                if _extra(current) != _extra(wanted):
                    current.set_extra(wanted.extra)
                    applied.changed += 1
            applied.connections.append(wanted.conn_id)
        for item in spec["variables"]:
            name, value = item["variable_name"], _as_text(item.get("variable_value", ""))
            current = session.query(Variable).filter(Variable.key == name).one_or_none()
            if current is None:
                session.add(Variable(key=name, val=value))
                applied.changed += 1
            elif current.val != value:
                current.set_val(value)
                applied.changed += 1
            applied.variables.append(name)
        for item in spec["pools"]:
            name, slots = item["pool_name"], int(item["pool_slot"])
            description = item.get("pool_description", "")
            current = session.query(Pool).filter(Pool.pool == name).one_or_none()
            if current is None:
                session.add(Pool(pool=name, slots=slots, description=description, include_deferred=False))
                applied.changed += 1
            elif (current.slots, current.description) != (slots, description):
                current.slots, current.description = slots, description
                applied.changed += 1
            applied.pools.append(name)
    log.info(
        "applied %s: %d connections, %d variables, %d pools, %d changes", path,
        len(applied.connections), len(applied.variables), len(applied.pools), applied.changed,
    )
    return applied


def _connection(item: dict[str, Any]):
    from airflow.models import Connection

    if item.get("conn_uri"):
        conn = Connection(conn_id=item["conn_id"], uri=item["conn_uri"])
    else:
        extra = item.get("conn_extra")
        conn = Connection(
            conn_id=item["conn_id"],
            conn_type=item.get("conn_type"),
            host=item.get("conn_host"),
            schema=item.get("conn_schema"),
            login=item.get("conn_login"),
            password=item.get("conn_password"),
            port=int(item["conn_port"]) if item.get("conn_port") not in (None, "") else None,
            extra=json.dumps(extra, sort_keys=True) if isinstance(extra, dict) else extra,
        )
    conn.description = item.get("conn_description")
    return conn


def _extra(conn) -> dict[str, Any]:
    try:
        return json.loads(conn.extra) if conn.extra else {}
    except json.JSONDecodeError:
        return {"__raw__": conn.extra}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
