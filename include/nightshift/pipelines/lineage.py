"""Trace one answer of the endpoint back: answer -> model version -> training run -> dataset version -> bytes."""

from __future__ import annotations

import logging
import re
from typing import Any

from nightshift.serving.requestlog import RequestLog
from nightshift.settings import Settings
from nightshift.stores import dataset_repository, prompt_registry_for, registry_for

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class NotTraceable(LookupError):
    """The answer is not in the request log (never logged, or older than the retention)."""


def trace_answer(settings: Settings, response_id: str) -> dict[str, Any]:
    """Return the logged answer (scrubbed), its feedback and its lineage; a missing link is said, not raised."""
    if not settings.request_log_url:
        raise NotTraceable("the request log is off (NIGHTSHIFT_SERVE_REQUEST_LOG=off)")
    request_log = RequestLog(settings.request_log_url, settings.request_log_retention_days)
    # The answer's id (chatcmpl-..., cmpl-...), or the X-Request-Id its response carried (the same hex id).
    candidates = [response_id]
    if _REQUEST_ID.fullmatch(response_id):
        candidates = [f"chatcmpl-{response_id}", f"cmpl-{response_id}"]
    try:
        request_log.open()
        answer = next((a for c in candidates if (a := request_log.answer(c)) is not None), None)
    finally:
        request_log.engine.dispose()
    if answer is None:
        raise NotTraceable(f"no answer {response_id!r} in the request log (older than "
                           f"{settings.request_log_retention_days:g} days, or never logged)")
    lineage: dict[str, Any] = {"model": {"name": answer["model_name"], "version": answer["model_version"],
                                         "role": answer["model_role"]}}
    registry = registry_for(settings)
    try:
        record = registry.get(answer["model_version"])
        lineage["model"].update(source=record.source, fingerprint=record.fingerprint)
        run = registry.client.get_run(record.run_id)
        lineage["run"] = {"run_id": record.run_id, "name": run.info.run_name, "status": run.info.status,
                          "dag_run": run.data.tags.get("airflow.run_key")}
        tag = record.dataset_tag
    except Exception as exc:  # the version may have been deleted since
        lineage["run"] = {"missing": f"{type(exc).__name__}: the registry has no such version or run any more"}
        tag = answer.get("dataset_tag")
    if tag:
        try:
            version = dataset_repository(settings).get(tag)
            lineage["dataset"] = {"tag": version.tag, "rev": version.rev, "md5": version.md5, "path": version.path,
                                  "documents": version.documents, "bytes": version.bytes}
        except Exception as exc:
            lineage["dataset"] = {"tag": tag, "missing": f"{type(exc).__name__}: not in the data repository"}
    else:
        lineage["dataset"] = {"missing": "the model version names no dataset"}
    lineage["prompt"] = _prompt(settings, answer)
    return {"answer": answer, "lineage": lineage}


def _prompt(settings: Settings, answer: dict[str, Any]) -> dict[str, Any]:
    """Return the prompt version the answer was given under, as the registry has it; or why there is none."""
    if not answer.get("prompt_name"):
        return {"missing": "no prompt template was applied (a completion, or no production prompt then)"}
    out: dict[str, Any] = {"name": answer["prompt_name"], "version": answer["prompt_version"],
                           "role": answer.get("prompt_role")}
    try:
        version = prompt_registry_for(settings).get(answer["prompt_name"], answer["prompt_version"])
        out.update(digest=version.digest, registered_by=version.registered_by, created_at=version.created_at,
                   message=version.message, uri=version.uri)
    except Exception as exc:  # deleted since, or altered in the store
        out["missing"] = f"{type(exc).__name__}: the prompt registry cannot give this version now"
    return out
