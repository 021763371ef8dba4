"""Where nightshift keeps its state, each store built from the settings: the model registry, the dataset
repository and the report store. Every DAG, command and step opens them here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nightshift.registry.mlflow_registry import ModelRegistry
    from nightshift.registry.prompt_registry import PromptRegistry
    from nightshift.reports.store import ReportStore
    from nightshift.settings import Settings
    from nightshift.versioning.dvc_store import DatasetRepository


def registry_for(settings: Settings) -> ModelRegistry:
    """Return the MLflow model registry (tracking store, registered model, artifact root, champion alias)."""
    from nightshift.registry.mlflow_registry import ModelRegistry

    return ModelRegistry(settings.tracking_uri, settings.registered_model, settings.artifact_root,
                         settings.champion_alias, lease_uri=settings.lease_uri)


def prompt_registry_for(settings: Settings) -> PromptRegistry:
    """Return MLflow's Prompt Registry of the installation (the tracking store), with the same lease as the models."""
    from nightshift.registry.prompt_registry import PromptRegistry

    return PromptRegistry(settings.tracking_uri, lease_uri=settings.lease_uri, lease_dir=settings.home / "locks")


def dataset_repository(settings: Settings) -> DatasetRepository:
    """Return the DVC repository of dataset versions, its remote and (when set) the git remote of its history."""
    from nightshift.versioning.dvc_store import DatasetRepository

    remote_config: dict[str, str] = {}
    if settings.dvc_remote.startswith("s3://"):
        from nightshift.airflow.connections import s3_remote_config

        remote_config = s3_remote_config(settings.s3_conn_id)
    return DatasetRepository(settings.data_repo, settings.dvc_remote, remote_config=remote_config,
                             git_remote=settings.data_git_remote)


def report_store(settings: Settings) -> ReportStore:
    """Return the folder of report pages and the catalog behind the nightshift UI view."""
    from nightshift.reports.store import ReportStore

    return ReportStore(settings.reports_dir)

