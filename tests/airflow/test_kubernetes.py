"""The kubernetes backend: render the trainer pod the DAG would send and validate it (no cluster exists here)."""

from unittest.mock import PropertyMock, patch

import kubernetes_validate
import pytest

from conftest import REPO
from nightshift.training.launch import launch_command

K8S_VERSION = "1.33"


@pytest.fixture(scope="module")
def finetune_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "finetune_model.py"))
    assert not bag.import_errors
    return bag.dags["finetune_model"]


def render_pod(task, command):
    """Build the pod request as the operator would at run time, with the XCom command resolved."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task.cmds = command
    with patch.object(KubernetesHook, "is_in_cluster", new_callable=PropertyMock, return_value=False):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


def test_both_backends_take_their_command_from_the_same_plan(finetune_dag):
    from airflow.sdk.definitions.xcom_arg import PlainXComArg

    pod_cmds = finetune_dag.task_dict["train_kubernetes"].cmds
    local_args = finetune_dag.task_dict["train_local"].op_args
    assert isinstance(pod_cmds, PlainXComArg)
    assert (pod_cmds.operator.task_id, pod_cmds.key) == ("plan_training", "command")
    assert (local_args[0].operator.task_id, local_args[0].key) == ("plan_training", "command")


def test_trainer_pod_is_valid_and_runs_the_local_command_on_gpus(finetune_dag, settings, tmp_path):
    command = launch_command(settings.work_dir / "run" / "trainer.json", settings.train_ranks, settings.master_port)
    pod = render_pod(finetune_dag.task_dict["train_kubernetes"], command)

    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["command"] == command
    assert container["command"][:3] == ["deepspeed", "--num_gpus", str(settings.train_ranks)]
    assert container["image"] == settings.kubernetes.image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(settings.train_ranks)
    assert pod["metadata"]["namespace"] == settings.kubernetes.namespace
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    assert mounts["state"] == str(settings.home)  # the config path in the command resolves inside the pod
    assert spec["nodeSelector"] == settings.kubernetes.node_selector
    assert spec["tolerations"] == settings.kubernetes.tolerations


def test_pod_settings_come_from_the_environment(monkeypatch):
    from nightshift.airflow.kubernetes import trainer_pod_operator
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_K8S_NAMESPACE", "ml-train")
    monkeypatch.setenv("NIGHTSHIFT_K8S_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}')
    monkeypatch.setenv("NIGHTSHIFT_K8S_TOLERATIONS", "[]")
    monkeypatch.setenv("NIGHTSHIFT_TRAIN_RANKS", "8")
    settings = load_settings()
    task = trainer_pod_operator("t", ["deepspeed"], settings)
    pod = render_pod(task, launch_command(settings.work_dir / "x.json", settings.train_ranks, 29500))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod["metadata"]["namespace"] == "ml-train"
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_malformed_json_settings_are_named(monkeypatch):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_K8S_TOLERATIONS", "[{oops")
    with pytest.raises(ValueError, match="NIGHTSHIFT_K8S_TOLERATIONS must be JSON"):
        load_settings()
