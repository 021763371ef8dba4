"""Runs, model versions and the champion alias in MLflow.

Checkpoints are logged as run artifacts and registered from ``runs:/<run_id>/checkpoint``: MLflow 3's
transformers flavor cannot save transformers 5 checkpoints (its pipeline-task lookup fails), and the
serving side loads plain Hugging Face folders anyway.

A checkpoint is uploaded file by file and then its manifest (every file's size and SHA-256) last, so the
manifest marks a complete upload: only such a checkpoint is registered, and a download is checked against
it before anyone loads it. Promotion records itself on the version (``nightshift.promoted_at``), so that
a version that was registered but never promoted is not mistaken for one that was.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from nightshift.faults import fault_point
from nightshift.provenance import file_sha256
from nightshift.records import ModelVersionRecord
from nightshift.registry.common import PROMOTED_TAG, mlflow_client, names_nothing
from nightshift.registry.history import PromotionHistory

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
MANIFEST = "MANIFEST.json"
RUN_KEY_TAG = "nightshift.run_key"
FINGERPRINT_TAG = "nightshift.fingerprint"
DATASET_TAG = "nightshift.dataset_tag"
MANIFEST_TAG = "nightshift.manifest_sha256"
"""The hash of a version's manifest, kept in the registry (the tracking store), not beside the files it lists:
whoever can rewrite the artifact store cannot also make a changed checkpoint match."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Return the SHA-256 of a manifest's canonical JSON."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint's files do not match its manifest (or it has none)."""


def checkpoint_manifest(folder: Path) -> dict[str, Any]:
    """Return ``{"files": {relative path: {"size", "sha256"}}}`` of a checkpoint folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in files}}


def verify_checkpoint(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise IncompleteCheckpoint unless every file of the manifest is in ``folder`` with its size and hash."""
    problems = []
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            problems.append(f"{rel} differs")
    if not manifest.get("files"):
        problems.append("the manifest lists no files")
    if problems:
        raise IncompleteCheckpoint(f"checkpoint in {folder} does not match its manifest: {', '.join(problems[:5])}")


class ModelRegistry:
    """The MLflow tracking server and model registry of one installation."""

    def __init__(self, tracking_uri: str, model_name: str, artifact_root: str | None, alias: str = "champion",
                 lease_dir: Path | None = None, lease_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        # None: a tracking server's own artifact store (``mlflow server --artifacts-destination``, proxied).
        self.artifact_root = artifact_root.rstrip("/") if artifact_root else None
        self.alias = alias
        # The database whose locks serialize alias moves (registry/lease.py): the tracking store unless told.
        self.lease_uri = lease_uri or tracking_uri
        # Where the release lease lives for a tracking server over HTTP (registry/lease.py); None: the home's locks.
        self.lease_dir = lease_dir
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        """Return the id of an experiment, creating it with an artifact location under the artifact root."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    def open_run(self, experiment: str, run_key: str, run_name: str, tags: dict[str, str]) -> str:
        """Return the run recorded under ``run_key``, creating it once; retries reuse the same run."""
        found = self.find_run(experiment, run_key)
        if found is not None:
            return found.info.run_id
        exp_id = self.experiment_id(experiment)
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

    def find_run(self, experiment: str, run_key: str):
        """Return the run recorded under ``run_key`` (see open_run), or None."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       max_results=1)
        return runs[0] if runs else None

    def upload_checkpoint(self, run_id: str, folder: Path) -> dict[str, Any]:
        """Upload a checkpoint folder to a run, its manifest last; skip it when the run already holds it whole."""
        manifest = checkpoint_manifest(folder)
        if self._uploaded_manifest(run_id) == manifest:
            log.info("run %s already holds this checkpoint (%d files)", run_id, len(manifest["files"]))
            return manifest
        for i, rel in enumerate(manifest["files"]):
            parent = Path(rel).parent.as_posix()
            artifact_dir = CHECKPOINT_ARTIFACT if parent == "." else f"{CHECKPOINT_ARTIFACT}/{parent}"
            self.client.log_artifact(run_id, str(folder / rel), artifact_dir)
            if i == 0:
                fault_point("registry.mid_upload")
        fault_point("registry.before_manifest")
        self.client.log_dict(run_id, manifest, f"{CHECKPOINT_ARTIFACT}/{MANIFEST}")
        return manifest

    def _uploaded_manifest(self, run_id: str) -> dict[str, Any] | None:
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        names = {Path(a.path).name for a in self.client.list_artifacts(run_id, CHECKPOINT_ARTIFACT)}
        if MANIFEST not in names:
            return None
        try:
            local = download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT}/{MANIFEST}",
                                       tracking_uri=self.tracking_uri)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(local).read_text())

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
        except MlflowException as exc:
            if names_nothing(exc):
                return []
            raise  # a store that was not read must not look empty: register() would add a duplicate version

    def find_by_fingerprint(self, fingerprint: str, promoted_only: bool = True) -> ModelVersionRecord | None:
        """Return the newest version trained from exactly this data, recipe and base model, if any.

        By default only versions that were promoted count: one whose promotion never happened must be
        trained, gated and promoted again rather than silently reused.
        """
        found = self._versions(f"name = '{self.model_name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
        if promoted_only and found:
            # The alias moves first and the record follows: the champion counts even if the record is missing.
            champion = self.champion()
            found = [mv for mv in found if (mv.tags or {}).get(PROMOTED_TAG)
                     or (champion is not None and int(mv.version) == champion.version)]
        return self._record(max(found, key=lambda mv: int(mv.version))) if found else None

    def champion(self) -> ModelVersionRecord | None:
        """Return the version the champion alias points at, or None before the first promotion.

        Any other failure to read the registry is raised (the task is retried), never read as "no champion".
        """
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.model_name, self.alias)
        except MlflowException as exc:
            if names_nothing(exc):
                return None
            raise
        return self._record(mv)

    def get(self, version: int) -> ModelVersionRecord:
        return self._record(self.client.get_model_version(self.model_name, str(version)))

    def download(self, version: ModelVersionRecord, cache_dir: Path) -> Path:
        """Return a local folder with the verified checkpoint of a version, downloading it once."""
        from mlflow.artifacts import download_artifacts

        dest = cache_dir / f"{version.name}-v{version.version}"
        if (dest / "config.json").is_file():
            return dest  # only a verified download is ever renamed into place
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = Path(download_artifacts(artifact_uri=version.source, dst_path=str(tmp), tracking_uri=self.tracking_uri))
        manifest_path = local / MANIFEST
        expected = self.version_tags(version.version).get(MANIFEST_TAG)
        try:
            if expected:
                # Registered with its manifest's hash: the manifest must be that one, and the folder exactly what
                # it lists (an extra file, a tokenizer config say, would be loaded with the weights).
                if not manifest_path.is_file():
                    raise IncompleteCheckpoint(f"{version.label}: its manifest is missing from the artifact store")
                manifest = json.loads(manifest_path.read_text())
                if manifest_digest(manifest) != expected:
                    raise IncompleteCheckpoint(f"{version.label}: its manifest differs from the one registered")
                verify_checkpoint(local, manifest)
                extra = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                               if p.is_file() and p.name != MANIFEST
                               and p.relative_to(local).as_posix() not in manifest["files"])
                if extra:
                    raise IncompleteCheckpoint(f"{version.label}: files the registered manifest does not list: "
                                               f"{', '.join(extra[:5])}")
            elif manifest_path.is_file():
                verify_checkpoint(local, json.loads(manifest_path.read_text()))
            elif not (local / "config.json").is_file():
                raise IncompleteCheckpoint(f"{version.label} has no manifest and no config.json")
            else:
                log.warning("%s was registered without a manifest: its files cannot be verified", version.label)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        local.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def prune_cache(self, cache_dir: Path, keep: list[ModelVersionRecord]) -> list[Path]:
        """Remove downloaded checkpoints of this model other than ``keep``; return what was removed."""
        wanted = {f"{v.name}-v{v.version}" for v in keep}
        removed = []
        if cache_dir.is_dir():
            for folder in cache_dir.iterdir():
                name = folder.name.removesuffix(".partial")
                if folder.is_dir() and name.startswith(f"{self.model_name}-v") and folder.name not in wanted:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    def register(self, run_id: str, tags: dict[str, str]) -> ModelVersionRecord:
        """Register the checkpoint of a run as a model version; a second call returns the same version."""
        from mlflow.exceptions import MlflowException

        existing = self._versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
        if existing:
            return self._record(existing[0])
        manifest = self._uploaded_manifest(run_id)
        if manifest is None:
            raise IncompleteCheckpoint(f"run {run_id} holds no complete checkpoint (no manifest): upload it first")
        tags = {**tags, MANIFEST_TAG: manifest_digest(manifest)}
        try:
            self.client.create_registered_model(self.model_name, description="Fine-tuned by nightshift")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        mv = self.client.create_model_version(
            self.model_name, f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", run_id=run_id, tags=tags
        )
        return self._record(mv)

    def promote(
        self, version: ModelVersionRecord, key: str | None = None, kind: str = "promotion", by: str = "",
        dag_run: str = "", reason: str = "", evaluation: dict[str, Any] | None = None,
        expected: int | str | None = None,
    ) -> ModelVersionRecord:
        """Point the champion alias at a version, record the move in the promotion history; return the version.

        ``key`` names the move for retries (see registry/history.py); without one each call is a new move.
        ``expected`` is the champion the version was judged against (a version number, or
        ``history.NO_CHAMPION``): when the alias names another, ChampionConflict is raised and nothing moves.
        """
        import uuid

        PromotionHistory(self).move(version, key or f"adhoc/{uuid.uuid4().hex}", kind, by or "nightshift",
                                    dag_run, reason, evaluation, expected=expected)
        return self.get(version.version)

    def version_tags(self, version: int) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, str(version)).tags or {})

    def set_version_tags(self, version: int, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, str(value))

    def versions(self) -> list[ModelVersionRecord]:
        return sorted((self._record(mv) for mv in self._versions(f"name = '{self.model_name}'")),
                      key=lambda v: v.version)
