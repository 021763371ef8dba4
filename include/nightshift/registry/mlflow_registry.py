"""Runs, model versions and the champion alias in MLflow.

Checkpoints are logged as run artifacts and registered from ``runs:/<run_id>/checkpoint``: MLflow 3's
transformers flavor cannot save transformers 5 checkpoints (its pipeline-task lookup fails), and the
serving side loads plain Hugging Face folders anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from nightshift.records import ModelVersionRecord

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
RUN_KEY_TAG = "nightshift.run_key"
FINGERPRINT_TAG = "nightshift.fingerprint"
DATASET_TAG = "nightshift.dataset_tag"


class ModelRegistry:
    """The MLflow tracking server and model registry of one installation."""

    def __init__(self, tracking_uri: str, model_name: str, artifact_root: str, alias: str = "champion") -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = artifact_root.rstrip("/")
        self.alias = alias
        self._client = None

    @property
    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        """Return the id of an experiment, creating it with an artifact location under the artifact root."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=f"{self.artifact_root}/{name}")

    def open_run(self, experiment: str, run_key: str, run_name: str, tags: dict[str, str]) -> str:
        """Return the run recorded under ``run_key``, creating it once; retries reuse the same run."""
        exp_id = self.experiment_id(experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: run_key})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_series(self, run_id: str, name: str, values: list[float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            self.client.log_batch(
                run_id, metrics=[Metric(name, float(v), now, start + i + 1) for i, v in enumerate(chunk)]
            )

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def _record(self, mv) -> ModelVersionRecord:
        aliases = list(getattr(mv, "aliases", []) or [])
        return ModelVersionRecord(
            name=mv.name, version=int(mv.version), run_id=mv.run_id or "", source=mv.source,
            dataset_tag=(mv.tags or {}).get(DATASET_TAG, ""), fingerprint=(mv.tags or {}).get(FINGERPRINT_TAG, ""),
            aliases=aliases,
        )

    def _versions(self, filter_string: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(filter_string))
        except MlflowException:
            return []

    def find_by_fingerprint(self, fingerprint: str) -> ModelVersionRecord | None:
        """Return the newest version trained from exactly this data, recipe and base model, if any."""
        found = self._versions(f"name = '{self.model_name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
        return self._record(max(found, key=lambda mv: int(mv.version))) if found else None

    def champion(self) -> ModelVersionRecord | None:
        """Return the version the champion alias points at, or None before the first promotion."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.model_name, self.alias)
        except MlflowException:
            return None
        return self._record(mv)

    def get(self, version: int) -> ModelVersionRecord:
        return self._record(self.client.get_model_version(self.model_name, str(version)))

    def download(self, version: ModelVersionRecord, cache_dir: Path) -> Path:
        """Return a local folder with the checkpoint of a version, downloading it once."""
        from mlflow.artifacts import download_artifacts

        dest = cache_dir / f"{version.name}-v{version.version}"
        if (dest / "config.json").is_file():
            return dest
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = Path(download_artifacts(artifact_uri=version.source, dst_path=str(tmp), tracking_uri=self.tracking_uri))
        shutil.rmtree(dest, ignore_errors=True)
        local.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def register(self, run_id: str, tags: dict[str, str]) -> ModelVersionRecord:
        """Register the checkpoint of a run as a model version; a second call returns the same version."""
        from mlflow.exceptions import MlflowException

        existing = self._versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
        if existing:
            return self._record(existing[0])
        try:
            self.client.create_registered_model(self.model_name, description="Fine-tuned by nightshift")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        mv = self.client.create_model_version(
            self.model_name, f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", run_id=run_id, tags=tags
        )
        return self._record(mv)

    def promote(self, version: ModelVersionRecord) -> ModelVersionRecord:
        """Point the champion alias at a version."""
        self.client.set_registered_model_alias(self.model_name, self.alias, str(version.version))
        log.info("%s is now %s@%s", version.label, self.model_name, self.alias)
        return self.get(version.version)
