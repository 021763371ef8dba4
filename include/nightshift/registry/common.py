"""What every registry module shares: the tags written on versions, and how MLflow says "nothing there"."""

from __future__ import annotations

PROMOTED_TAG = "nightshift.promoted_at"
"""On a model version once it has been champion: when it first was (set by the promotion history)."""


def names_nothing(exc: Exception) -> bool:
    """Return whether an MLflow error says the registered model or the alias does not exist.

    Only that means "no such version": a locked or unreachable store raises too (TEMPORARILY_UNAVAILABLE,
    INTERNAL_ERROR, ...), and reading that as "no champion" would act on a registry that was never read.
    MLflow raises RESOURCE_DOES_NOT_EXIST for a missing model and INVALID_PARAMETER_VALUE ("Registered model
    alias ... not found.") for a missing alias.
    """
    code = getattr(exc, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    text = str(getattr(exc, "message", exc)).lower()
    return code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text


def mlflow_client(tracking_uri: str):
    """Return an MLflow client of one tracking store, its registry the same store (telemetry off)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
