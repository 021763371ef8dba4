"""The cluster deployment offline: the Airflow chart's values (docker/airflow/values.yaml), KubernetesExecutor's
pod template and the training task's GPU pod override, validated against the Kubernetes 1.33 schema (there is
no cluster here, and the chart's own values schema cannot be fetched: docs/deploy.md has `helm lint` do that)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

from conftest import REPO

K8S_VERSION = "1.33"
VALUES = REPO / "docker" / "airflow" / "values.yaml"


def cluster_settings(settings):
    return dataclasses.replace(settings, home=Path("/opt/nightshift/state"))


def test_the_chart_values_run_celery_and_kubernetes_executors_on_external_postgres_with_static_secrets(settings):
    from nightshift.airflow.kubernetes import executor_pod_template

    values = yaml.safe_load(VALUES.read_text())
    assert values["executor"] == "CeleryExecutor,KubernetesExecutor" and values["airflowVersion"] == "3.3.2"
    assert values["postgresql"]["enabled"] is False and values["pgbouncer"]["enabled"] is True
    assert values["data"]["metadataSecretName"] and values["fernetKeySecretName"] and values["jwtSecretName"]
    assert values["config"]["core"]["auth_manager"].endswith("FabAuthManager")
    assert "AUTH_OAUTH" in values["apiServer"]["apiServerConfig"]
    assert values["config"]["logging"]["remote_base_log_folder"].startswith("s3://")
    assert values["config"]["openlineage"]["extractors"] == "nightshift.airflow.lineage.TaskRecordExtractor"
    assert values["dagProcessor"]["enabled"] and values["triggerer"]["enabled"]
    pod = yaml.safe_load(values["podTemplate"])
    assert pod == executor_pod_template(cluster_settings(settings))  # the file says what the code builds
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    mounted = {m["mountPath"] for m in values["workers"]["extraVolumeMounts"]}
    assert mounted == {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}


def test_the_training_task_asks_the_kubernetes_executor_for_a_gpu_pod(settings):
    """finetune_model parsed with NIGHTSHIFT_TRAIN_EXECUTOR=KubernetesExecutor (in a process of its own, as the DAG
    processor parses it): train_local names the executor and carries a valid GPU pod override."""
    code = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from kubernetes.client import ApiClient
bag = DagBag(dag_folder=sys.argv[1])
task = bag.dags["finetune_model"].get_task("train_local")
other = bag.dags["finetune_model"].get_task("evaluate")
pod = ApiClient().sanitize_for_serialization(task.executor_config["pod_override"])
print(json.dumps({"executor": task.executor, "other": other.executor, "pod": pod}))
"""
    env = {**os.environ, "NIGHTSHIFT_TRAIN_EXECUTOR": "KubernetesExecutor", "NIGHTSHIFT_K8S_GPUS": "4",
           "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor,KubernetesExecutor",
           # as kubectl writes a toleration (camelCase), not as the Python client names its fields
           "NIGHTSHIFT_K8S_TOLERATIONS": json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists",
                                                      "effect": "NoExecute", "tolerationSeconds": 300}])}
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "dags")], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["executor"] == "KubernetesExecutor" and out["other"] is None
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "override"}, **out["pod"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    container = pod["spec"]["containers"][0]
    assert container["name"] == "base" and container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                                           "tolerationSeconds": 300}]
