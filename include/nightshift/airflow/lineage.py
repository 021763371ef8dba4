"""OpenLineage events for nightshift's tasks, with what each one really read and wrote.

The OpenLineage provider emits a START and a COMPLETE (or FAIL) event for every task; for TaskFlow tasks it knows
no inputs or outputs. ``TaskRecordExtractor`` (registered by ``[openlineage] extractors``) reads the record a task
returned, the same XCom the next task reads, and names the data in it:

    source (sources.yaml, or the run's one-off source) -> corpus-vN -> nightshift-llm/vM -> nightshift-llm@champion

A dataset's name says which version it is; the facets say where its bytes live (the DVC remote and the content
hash, the registry's artifact URI). Events go to a file of JSON lines under ``$NIGHTSHIFT_HOME/lineage/`` (the
provider's file transport, set in nightshift.environment), or, with ``AIRFLOW__OPENLINEAGE__CONFIG_CONN_ID`` naming
an Airflow connection whose extra holds an OpenLineage client config, wherever that says (an HTTP transport to
Marquez: docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from airflow.providers.openlineage.extractors.base import BaseExtractor, OperatorLineage
from openlineage.client.event_v2 import Dataset
from openlineage.client.facet_v2 import datasource_dataset, documentation_dataset
from openlineage.client.transport.transform import EventTransformer

log = logging.getLogger(__name__)

NAMESPACE = "nightshift"


def _dataset(name: str, uri: str | None = None, about: str | None = None) -> Dataset:
    facets: dict[str, Any] = {}
    if uri:
        facets["dataSource"] = datasource_dataset.DatasourceDatasetFacet(name=uri.split("://", 1)[0], uri=uri)
    if about:
        facets["documentation"] = documentation_dataset.DocumentationDatasetFacet(description=about)
    return Dataset(namespace=NAMESPACE, name=name, facets=facets)


def source_dataset(spec: dict[str, Any]) -> Dataset:
    """Return a source of a night: ``sources/<name>``, its kind the facet (never its settings: they may hold
    addresses or queries a person wrote)."""
    return _dataset(f"sources/{spec['name']}", about=f"{spec.get('kind', '?')} source {spec['name']}")


def corpus_dataset(version: dict[str, Any], remote: str | None = None) -> Dataset:
    """Return a dataset version: ``datasets/<tag>``, where its bytes are in the DVC remote (content-addressed)."""
    md5 = str(version.get("md5", ""))
    uri = f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}" if remote and len(md5) == 32 else None
    if uri and "://" not in uri:
        uri = Path(uri).as_uri()
    return _dataset(f"datasets/{version['tag']}", uri,
                    f"{version.get('documents', '?')} documents, md5 {md5}")


def model_dataset(version: dict[str, Any]) -> Dataset:
    """Return a registered model version: ``models/<name>/v<version>``, its checkpoint's artifact URI."""
    return _dataset(f"models/{version['name']}/v{int(version['version'])}", version.get("source") or None,
                    f"trained on {version.get('dataset_tag') or '?'}")


def alias_dataset(name: str, alias: str) -> Dataset:
    """Return a registry alias (``models/<name>@champion``): what the endpoint serves."""
    return _dataset(f"models/{name}@{alias}")


def task_lineage(dag_id: str, task_id: str, result: Any, pull, settings) -> tuple[list[Dataset], list[Dataset]]:
    """Return (inputs, outputs) of one finished task, from its returned record (``pull(task_id)`` reads another
    task's record of the same run)."""
    if not isinstance(result, dict):
        return [], []
    if dag_id == "ingest_corpus" and task_id == "version_dataset" and result.get("tag"):
        specs = pull("plan_sources") or []
        return ([source_dataset(s) for s in specs if isinstance(s, dict) and s.get("name")],
                [corpus_dataset(result, settings.dvc_remote)])
    if dag_id == "finetune_model" and task_id == "register_candidate" and result.get("version"):
        inputs = [_dataset(f"datasets/{result['dataset_tag']}")] if result.get("dataset_tag") else []
        return inputs, [model_dataset(result)]
    if dag_id == "finetune_model" and task_id == "promote_candidate" and result.get("version"):
        model = {"name": settings.registered_model, **result}
        return [model_dataset(model)], [alias_dataset(model["name"], settings.champion_alias)]
    return [], []


class TaskRecordExtractor(BaseExtractor):
    """Inputs and outputs of nightshift's TaskFlow tasks, read from the records they return."""

    @classmethod
    def get_operator_classnames(cls) -> list[str]:
        return ["_PythonDecoratedOperator"]

    def _execute_extraction(self) -> OperatorLineage | None:
        return OperatorLineage()

    def extract_on_complete(self, task_instance) -> OperatorLineage | None:
        from nightshift.settings import load_settings

        def pull(task_id: str):
            return task_instance.xcom_pull(task_ids=task_id, key="return_value")

        try:
            result = task_instance.xcom_pull(task_ids=task_instance.task_id, key="return_value",
                                             map_indexes=task_instance.map_index)
            inputs, outputs = task_lineage(task_instance.dag_id, task_instance.task_id, result, pull,
                                           load_settings())
        except Exception as exc:  # lineage must never fail a task that succeeded
            log.warning("no lineage for %s.%s: %s", task_instance.dag_id, task_instance.task_id,
                        type(exc).__name__)
            return OperatorLineage()
        return OperatorLineage(inputs=inputs, outputs=outputs)


class ConfRedactor(EventTransformer):
    """Keep only the names of a DAG run's Params in the events (the provider copies the whole ``conf`` into every
    event's run facets): the values are what a person typed, a one-off source's path or URL among them."""

    def transform(self, event):
        facets = getattr(getattr(event, "run", None), "facets", None) or {}
        for facet in facets.values():
            dag_run = getattr(facet, "dagRun", None)
            if isinstance(dag_run, dict) and isinstance(dag_run.get("conf"), dict):
                dag_run["conf"] = {str(key)[:64]: "<redacted>" for key in dag_run["conf"]}
        return event


def lineage_file(home: Path) -> Path:
    """Return the file the events go to when no lineage connection is set."""
    return home / "lineage" / "events.jsonl"


def read_events(home: Path) -> list[dict[str, Any]]:
    """Return the events of the home's lineage file, oldest first (lines a writer cut short are skipped)."""
    path = lineage_file(home)
    events = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
