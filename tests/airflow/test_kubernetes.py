"""The kubernetes backend: render the trainer pod the DAG would send and validate it (no cluster exists here)."""

from pathlib import Path
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


def render_pod(task, plan):
    """Build the pod request as the operator would at run time, with the plan (an XCom) resolved."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task.plan = plan
    task.prepare({})
    with patch.object(KubernetesHook, "is_in_cluster", new_callable=PropertyMock, return_value=False):
        pod = task.build_pod_request_obj()
    return ApiClient().sanitize_for_serialization(pod)


def test_both_backends_take_their_command_from_the_same_plan(finetune_dag):
    from airflow.sdk.definitions.xcom_arg import PlainXComArg

    pod_plan = finetune_dag.task_dict["train_kubernetes"].plan
    local_args = finetune_dag.task_dict["train_local"].op_args
    assert isinstance(pod_plan, PlainXComArg)
    assert pod_plan.operator.task_id == "plan_training"
    assert (local_args[0].operator.task_id, local_args[0].key) == ("plan_training", "command")


def test_trainer_pod_is_valid_and_runs_the_local_command_on_one_gpu_per_rank(finetune_dag, settings, tmp_path):
    command = launch_command(settings.work_dir / "run" / "trainer.json", 4, settings.master_port)
    pod = render_pod(finetune_dag.task_dict["train_kubernetes"], {"command": command, "ranks": 4})

    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["command"] == command
    assert container["command"][:3] == ["torchrun", "--nproc-per-node", "4"]
    assert container["image"] == settings.kubernetes.image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"  # the plan's ranks, not a fixed number
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
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
    from nightshift.pipelines.finetune import FinetuneRequest
    from nightshift.settings import load_settings
    from nightshift.training.recipe import TrainingRecipe

    monkeypatch.setenv("NIGHTSHIFT_K8S_NAMESPACE", "ml-train")
    monkeypatch.setenv("NIGHTSHIFT_K8S_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}')
    monkeypatch.setenv("NIGHTSHIFT_K8S_TOLERATIONS", "[]")
    monkeypatch.setenv("NIGHTSHIFT_K8S_GPUS", "8")
    settings = load_settings()
    request = FinetuneRequest(base_model="m", train_steps=None, learning_rate=None, backend="kubernetes")
    ranks = request.ranks_per_node(settings, TrainingRecipe.load("default"))  # ranks: auto
    assert ranks == 8
    task = trainer_pod_operator("t", None, settings)
    pod = render_pod(task, {"command": launch_command(settings.work_dir / "x.json", ranks, 29500), "ranks": ranks})
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod["metadata"]["namespace"] == "ml-train"
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_malformed_json_settings_are_named(monkeypatch):
    from nightshift.settings import load_settings

    monkeypatch.setenv("NIGHTSHIFT_K8S_TOLERATIONS", "[{oops")
    with pytest.raises(ValueError, match="NIGHTSHIFT_K8S_TOLERATIONS must be JSON"):
        load_settings()


# ---- several nodes: an Indexed Job with a headless Service ------------------------------------------------------

class _Run:
    dag_id, run_id = "finetune_model", "manual__2026-11-30T00:00:00+00:00"


class _TI:
    dag_id, task_id, run_id, try_number, map_index = "finetune_model", "train_kubernetes_nodes", _Run.run_id, 2, -1


def render_job(task, plan):
    """Build the Job and Service the operator would send at run time, for try 2 of a run."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task.plan = plan
    context = {"dag_run": _Run(), "ti": _TI(), "run_id": _Run.run_id, "dag": task.dag}
    service = task.prepare(context)
    with patch.object(KubernetesHook, "is_in_cluster", new_callable=PropertyMock, return_value=False):
        job = task.build_job_request_obj(context)
    api = ApiClient()
    return api.sanitize_for_serialization(job), api.sanitize_for_serialization(service)


@pytest.fixture
def two_node_plan(settings, tiny_model, train_blocks, tmp_path):
    """plan_training's output for 2 nodes of 1 rank each, on the tiny model."""
    from nightshift.pipelines.finetune import plan_training
    from nightshift.records import PackedDataset
    from trainer_runs import tiny_recipe

    packed = PackedDataset(train_path=str(train_blocks), heldout_path=str(train_blocks), train_blocks=40,
                           heldout_blocks=40, train_tokens=2560, heldout_tokens=2560, train_documents=40,
                           heldout_documents=1, seq_len=64, tokenizer=str(tiny_model))
    return plan_training(settings, tiny_model, packed, tiny_recipe(checkpoint_interval=0), tmp_path / "run", ranks=1,
                         nodes=2)


def test_several_nodes_render_a_valid_indexed_job_and_headless_service(finetune_dag, settings, two_node_plan):
    job, service = render_job(finetune_dag.task_dict["train_kubernetes_nodes"], two_node_plan)

    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 2, 2, 0)  # one pod per node; any pod that dies fails the Job (and the task retries)
    name = job["metadata"]["name"]
    assert name.startswith("job-nightshift-train-") and name.endswith("-t2")  # a Job of its own per try
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = pod["containers"]
    assert container["command"] == two_node_plan["node_command"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NIGHTSHIFT_HOME"]["value"] == str(settings.home)  # the command's paths resolve on the volume
    assert env["MASTER_ADDR"]["value"] == \
        f"{name}-0.{service['metadata']['name']}.{settings.kubernetes.namespace}.svc.cluster.local"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(two_node_plan["ranks"])
    assert container["command"][:5] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "1"]


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """Expand $(VAR) in a container argument as the kubelet does (unknown names stay as written)."""
    import re

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.e2e
def test_two_nodes_rendezvous_and_train_as_one_world_when_run_as_local_processes(finetune_dag, two_node_plan,
                                                                                 tmp_path):
    """Run each pod's exact command and environment as a local process, MASTER_ADDR on 127.0.0.1."""
    import json
    import os
    import subprocess

    from conftest import free_port
    from nightshift.training.launch import launch_command, local_env, run_local, with_master_port
    from nightshift.training.trainer import TrainerConfig

    plan = {**two_node_plan, "master_port": free_port()}
    plan["node_command"] = with_master_port(plan["node_command"], plan["master_port"])
    job, _ = render_job(finetune_dag.task_dict["train_kubernetes_nodes"], plan)
    container = job["spec"]["template"]["spec"]["containers"][0]
    nodes = []
    for index in range(job["spec"]["completions"]):
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env.update({"NODE_RANK": str(index), "MASTER_ADDR": "127.0.0.1"})  # the Job's index; pod 0 is here
        command = [kubelet_expand(a, env) for a in container["command"]]
        nodes.append(subprocess.Popen(command, env={**local_env(), **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 ranks" in outputs[0]
    two_nodes = json.loads((tmp_path / "run" / "candidate" / "metrics.json").read_text())
    assert two_nodes["world_size"] == 2

    # The same run on one node with two ranks: same world, same data order, the same losses.
    config = TrainerConfig.read(Path(plan["config_path"]))
    one = TrainerConfig(**{**config.__dict__, "output_dir": str(tmp_path / "one" / "candidate"),
                           "checkpoint_dir": str(tmp_path / "one" / "checkpoints")}).write(tmp_path / "one.json")
    run_local(launch_command(one, 2, free_port()), local_env(), tmp_path / "one" / "trainer.log")
    one_node = json.loads((tmp_path / "one" / "candidate" / "metrics.json").read_text())
    assert two_nodes["losses"] == pytest.approx(one_node["losses"], abs=1e-6, rel=0)
    assert os.path.isfile(tmp_path / "run" / "candidate" / "checkpoint" / "model.safetensors")
