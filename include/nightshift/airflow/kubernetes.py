"""The kubernetes training backend: the same launcher command as the local backend, on GPU nodes.

One node runs in one pod (``TrainerPodOperator``) with one GPU per rank of the plan. Several nodes run as an
Indexed Job with one pod per node and a headless Service that gives pod 0 a DNS name for the rendezvous
(``TrainerJobOperator``); every pod runs the same ``torchrun`` command, its node rank taken from the Job's
completion index.
``backoffLimit: 0``: a pod that dies fails the Job, the Airflow task fails and its retry (a new Job) resumes
from the newest checkpoint on the shared state volume. Marking the task failed deletes the Job and its pods.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from nightshift.settings import Settings
from nightshift.training.launch import MASTER_ADDR_VAR, NODE_RANK_VAR

log = logging.getLogger(__name__)

TRAINER_CONTAINER = "base"  # KubernetesPodOperator's name for the main container
RUN_LABEL = "nightshift.io/train-run"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_PREFIX = "job-"  # what KubernetesJobOperator puts before every Job name


def gpu_resources(cpu: str, memory: str, gpus: int):
    """Return a trainer container's resources: one ``nvidia.com/gpu`` per rank, the CPU and memory it asks for."""
    from kubernetes.client import models as k8s

    return k8s.V1ResourceRequirements(
        requests={"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
        limits={"memory": memory, "nvidia.com/gpu": str(gpus)},
    )


def toleration(spec: dict[str, Any]):
    """Return a V1Toleration from a toleration as Kubernetes writes it (``tolerationSeconds``) or as the client
    names it (``toleration_seconds``); an unknown key is an error that names NIGHTSHIFT_K8S_TOLERATIONS."""
    from kubernetes.client import models as k8s

    fields = {"key", "operator", "value", "effect", "toleration_seconds"}
    args = {re.sub(r"(?<!^)(?=[A-Z])", "_", str(k)).lower(): v for k, v in dict(spec).items()}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"NIGHTSHIFT_K8S_TOLERATIONS: unknown toleration field(s) {', '.join(unknown)}; a toleration "
                         "has key, operator, value, effect and tolerationSeconds")
    return k8s.V1Toleration(**args)


def pod_settings(settings: Settings) -> dict[str, Any]:
    """Return the KubernetesPodOperator arguments every trainer pod shares: image, GPUs, /dev/shm, state volume.

    Each pod requests one ``nvidia.com/gpu`` per rank (NIGHTSHIFT_K8S_GPUS until the plan says how many ranks
    the run has), mounts a memory-backed ``/dev/shm`` (NCCL needs far more than the 64 MiB default) and the
    shared state volume (models, packed data, checkpoints, outputs) at the path the command refers to.
    """
    from kubernetes.client import models as k8s

    k = settings.kubernetes
    return {
        "namespace": k.namespace,
        "image": k.image,
        "env_vars": {"NIGHTSHIFT_HOME": str(settings.home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        "container_resources": gpu_resources(k.cpu, k.memory, k.gpus),
        "volumes": [
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=k.shm_size)),
            k8s.V1Volume(name="state",
                         persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k.state_pvc)),
        ],
        "volume_mounts": [
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="state", mount_path=str(settings.home)),
        ],
        "node_selector": dict(k.node_selector),
        "tolerations": [toleration(t) for t in k.tolerations],
        "kubernetes_conn_id": k.conn_id,
        "labels": {"app.kubernetes.io/name": "nightshift-trainer", "app.kubernetes.io/part-of": "nightshift"},
        "get_logs": True,
        "startup_timeout_seconds": 900,
    }


class TrainerPodOperator(KubernetesPodOperator):
    """Run one single-node training attempt in a GPU pod: the plan's command, one GPU per rank of the plan.

    ``plan`` is the plan_training task's output (templated); how many ranks (GPUs) a run has is known only
    then, since the recipe a person picks may fix it.
    """

    template_fields = (*KubernetesPodOperator.template_fields, "plan")

    def __init__(self, *, plan: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(name="nightshift-trainer", on_finish_action="delete_succeeded_pod",
                         **pod_settings(settings), **kwargs)
        self.plan = plan
        self.pod_cpu, self.pod_memory = settings.kubernetes.cpu, settings.kubernetes.memory

    def prepare(self, context: Any) -> None:
        """Fill in this attempt's pod from the plan: the launcher argv and the GPUs it starts ranks on."""
        self.cmds = list(self.plan["command"])
        self.container_resources = gpu_resources(self.pod_cpu, self.pod_memory, int(self.plan["ranks"]))

    def execute(self, context: Any):
        self.prepare(context)
        return super().execute(context)


def trainer_pod_operator(task_id: str, plan: Any, settings: Settings, **kwargs: Any):
    """Return the operator that runs a single-node training attempt in one GPU pod (see TrainerPodOperator)."""
    return TrainerPodOperator(task_id=task_id, plan=plan, settings=settings, **kwargs)


def run_hash(dag_id: str, run_id: str) -> str:
    """Return a short DNS-safe key of one DAG run, shared by its Jobs (one per try) and its Service."""
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:10]


def rendezvous_service(name: str, namespace: str, run_key: str, port: int):
    """Return the headless Service giving each trainer pod of a run a DNS name (``<pod hostname>.<name>``)."""
    from kubernetes.client import models as k8s

    return k8s.V1Service(
        api_version="v1", kind="Service",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={
            "app.kubernetes.io/name": "nightshift-trainer", "app.kubernetes.io/part-of": "nightshift",
            RUN_LABEL: run_key}),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None",  # headless: DNS names for the pods, no virtual IP
            publish_not_ready_addresses=True,  # resolvable before the pods report ready
            selector={RUN_LABEL: run_key},
            ports=[k8s.V1ServicePort(name="rendezvous", port=port, target_port=port, protocol="TCP")],
        ),
    )


class TrainerJobOperator(KubernetesJobOperator):
    """Run one multi-node training attempt as an Indexed Job of ``plan['nodes']`` pods, and wait for it.

    ``plan`` is the plan_training task's output (templated): the per-node command, the node count and the
    rendezvous port. The Job of each try has a name of its own (``...-t<try>``); the run's Service is kept
    across tries and deleted when an attempt ends.
    """

    template_fields = (*KubernetesJobOperator.template_fields, "plan")

    def __init__(self, *, plan: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            completion_mode="Indexed", backoff_limit=0, wait_until_job_complete=True, job_poll_interval=15,
            random_name_suffix=False, on_finish_action="delete_succeeded_pod", **pod_settings(settings),
            **kwargs,
        )
        self.plan = plan
        self.base_env = dict(self.env_vars)
        self.pod_cpu, self.pod_memory = settings.kubernetes.cpu, settings.kubernetes.memory

    def prepare(self, context: Any) -> Any:
        """Fill in this attempt's Job from the plan and the run; return the run's rendezvous Service."""
        from kubernetes.client import models as k8s

        plan = self.plan
        run = context["dag_run"]
        key = run_hash(run.dag_id, run.run_id)
        service = f"nightshift-train-{key}"
        self.name = f"nightshift-train-{key}-t{context['ti'].try_number}"
        job_name = JOB_PREFIX + self.name
        self.completions = self.parallelism = int(plan["nodes"])
        self.subdomain = service
        self.labels = {**self.labels, RUN_LABEL: key}
        self.cmds = list(plan["node_command"])
        self.container_resources = gpu_resources(self.pod_cpu, self.pod_memory, int(plan["ranks"]))
        master = f"{job_name}-0.{service}.{self.namespace}.svc.cluster.local"
        self.env_vars = [k8s.V1EnvVar(name=n, value=v) for n, v in self.base_env.items()] + [
            k8s.V1EnvVar(name=MASTER_ADDR_VAR, value=master),
            k8s.V1EnvVar(name=NODE_RANK_VAR, value_from=k8s.V1EnvVarSource(
                field_ref=k8s.V1ObjectFieldSelector(
                    field_path=f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"))),
        ]
        return rendezvous_service(service, self.namespace, key, int(plan["master_port"]))

    def execute(self, context: Any):
        from kubernetes.client.exceptions import ApiException

        service = self.prepare(context)
        core = self.hook.core_v1_client
        try:
            core.create_namespaced_service(namespace=self.namespace, body=service)
        except ApiException as exc:
            if exc.status != 409:  # 409: an earlier try of this run created it
                raise
        log.info("training on %d nodes: Job %s%s, rendezvous at pod 0 of Service %s", self.completions,
                 JOB_PREFIX, self.name, service.metadata.name)
        try:
            return super().execute(context)
        finally:
            try:
                core.delete_namespaced_service(name=service.metadata.name, namespace=self.namespace)
            except ApiException as exc:
                log.warning("could not delete Service %s (%s)", service.metadata.name, exc.status)


def trainer_job_operator(task_id: str, plan: Any, settings: Settings, **kwargs: Any):
    """Return the operator that runs a multi-node training attempt as an Indexed Job (see TrainerJobOperator)."""
    return TrainerJobOperator(task_id=task_id, plan=plan, settings=settings, **kwargs)


EXECUTOR_IMAGE = "nightshift-airflow:latest"
"""The Airflow image with nightshift (docker/airflow/Dockerfile) that KubernetesExecutor's task pods run."""


def executor_pod_template(settings: Settings, image: str = EXECUTOR_IMAGE) -> dict[str, Any]:
    """Return KubernetesExecutor's pod template (the chart's ``podTemplate``, docker/airflow/values.yaml): the
    nightshift Airflow image, the installation's settings from the ``nightshift-settings`` Secret, and the shared
    state volume at NIGHTSHIFT_HOME. Airflow fills in the ``base`` container's command for each task."""
    k = settings.kubernetes
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nightshift-task", "labels": {"app.kubernetes.io/name": "nightshift-task",
                                                           "app.kubernetes.io/part-of": "nightshift"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsUser": 50000, "runAsGroup": 0, "fsGroup": 0},
            "containers": [{
                "name": TRAINER_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
                # [core] executor stays the deployment's: the task parses its DAG, and a task that names the
                # KubernetesExecutor is refused where that executor is not configured.
                "env": [{"name": "NIGHTSHIFT_HOME", "value": str(settings.home)}],
                "envFrom": [{"secretRef": {"name": "nightshift-settings"}}],
                "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
                "volumeMounts": [{"name": "state", "mountPath": str(settings.home)}],
            }],
            "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": k.state_pvc}}],
        },
    }


def gpu_pod_override(settings: Settings):
    """Return the ``pod_override`` that puts a task on a GPU node: the trainer's GPUs, CPU and memory, a
    memory-backed /dev/shm, the GPU nodes' selector and tolerations (the rest comes from the pod template)."""
    from kubernetes.client import models as k8s

    k = settings.kubernetes
    return k8s.V1Pod(spec=k8s.V1PodSpec(
        containers=[k8s.V1Container(name=TRAINER_CONTAINER, resources=gpu_resources(k.cpu, k.memory, k.gpus),
                                    volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")])],
        volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                                size_limit=k.shm_size))],
        node_selector=dict(k.node_selector), tolerations=[toleration(t) for t in k.tolerations]))


def train_executor_args(settings: Settings) -> dict[str, Any]:
    """Return the ``executor`` and ``executor_config`` of the local training task: on NIGHTSHIFT_TRAIN_EXECUTOR
    (e.g. KubernetesExecutor beside CeleryExecutor) in a GPU pod, else on the default executor."""
    if not settings.train_executor:
        return {}
    args: dict[str, Any] = {"executor": settings.train_executor}
    if settings.train_executor.rsplit(".", 1)[-1] == "KubernetesExecutor":
        args["executor_config"] = {"pod_override": gpu_pod_override(settings)}
    return args
