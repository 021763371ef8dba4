"""The trainer pod: the same launcher command as the local backend, on GPU nodes of a Kubernetes cluster."""

from __future__ import annotations

from typing import Any

from nightshift.settings import Settings

TRAINER_CONTAINER = "base"  # KubernetesPodOperator's name for the main container


def trainer_pod_operator(task_id: str, cmds: Any, settings: Settings, **kwargs: Any):
    """Return a KubernetesPodOperator running ``cmds`` (the launcher argv, usually an XComArg) in the trainer image.

    The pod requests one ``nvidia.com/gpu`` per rank, mounts a memory-backed ``/dev/shm`` (NCCL needs far more
    than the 64 MiB default) and the shared state volume (models, packed data, outputs) at the path the
    command refers to.
    """
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    k = settings.kubernetes
    gpus = str(settings.train_ranks)
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": k.cpu, "memory": k.memory, "nvidia.com/gpu": gpus},
        limits={"memory": k.memory, "nvidia.com/gpu": gpus},
    )
    volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=k.shm_size)),
        k8s.V1Volume(
            name="state", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k.state_pvc)
        ),
    ]
    mounts = [
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="state", mount_path=str(settings.home)),
    ]
    tolerations = [k8s.V1Toleration(**t) for t in k.tolerations]
    return KubernetesPodOperator(
        task_id=task_id,
        name="nightshift-trainer",
        namespace=k.namespace,
        image=k.image,
        cmds=cmds,
        env_vars={"NIGHTSHIFT_HOME": str(settings.home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        container_resources=resources,
        volumes=volumes,
        volume_mounts=mounts,
        node_selector=dict(k.node_selector),
        tolerations=tolerations,
        kubernetes_conn_id=k.conn_id,
        labels={"app.kubernetes.io/name": "nightshift-trainer", "app.kubernetes.io/part-of": "nightshift"},
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=900,
        **kwargs,
    )
