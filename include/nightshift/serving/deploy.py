"""Kubernetes manifests of the GPU serving path: vLLM engines on GPU nodes, nightshift's front before them.

``nightshift deploy-manifests`` writes them (``kubectl apply -f``). Per role (``champion``, ``candidate``)
an engine Deployment: an init container (the nightshift-serving image) runs ``nightshift fetch-model``,
which downloads the version the registry alias names, checks it against its manifest and writes its number;
vLLM then serves that folder as ``<model>-v<N>``, so the front can tell which version it answers with. The
front Deployment runs ``nightshift serve`` with ``NIGHTSHIFT_SERVE_UPSTREAM`` pointing at the engines'
Services: API keys, limits, canary and shadow routing, the request log, feedback and metrics stay in
nightshift. After a promotion, ``kubectl rollout restart deployment/<engine>`` makes the engine fetch the
new version; until it serves it, the front keeps answering with (and naming) the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nightshift.settings import Settings

PART_OF = {"app.kubernetes.io/part-of": "nightshift"}
ENGINE_PORT = 8000


@dataclass(frozen=True)
class ServingCluster:
    """What the serving manifests need to know about the cluster."""

    namespace: str = "nightshift"
    vllm_image: str = "vllm/vllm-openai:v0.33.0"
    front_image: str = "nightshift-serving:latest"
    gpus_per_engine: int = 1
    gpu_memory_utilization: float = 0.90
    max_model_len: int = 8192
    front_replicas: int = 2
    front_max_replicas: int = 10
    queue_depth_target: int = 4
    """Requests waiting per front the autoscaler aims at (nightshift_queue_depth, averaged over the fronts)."""
    secret: str = "nightshift-serving"
    """Secret with MLFLOW_TRACKING_URI (the shared registry), NIGHTSHIFT_API_KEYS and NIGHTSHIFT_SERVE_REQUEST_LOG."""
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ServingCluster:
        k = settings.kubernetes
        return cls(namespace=k.namespace, node_selector=dict(k.node_selector), tolerations=list(k.tolerations),
                   **overrides)


def engine_name(role: str) -> str:
    return f"nightshift-vllm-{role}"


def _secret_env(secret: str, *names: str) -> list[dict[str, Any]]:
    return [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret, "key": n, "optional": True}}} for n in names]


def engine(cluster: ServingCluster, settings: Settings, role: str) -> list[dict[str, Any]]:
    """Return the Deployment and Service of the vLLM engine serving the registry's ``role`` alias."""
    name = engine_name(role)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "engine", **PART_OF}
    alias = settings.champion_alias if role == "champion" else "candidate"
    serve = (f'exec vllm serve /models/model --served-model-name "{settings.registered_model}-v$(cat /models/VERSION)" '
             f"--host 0.0.0.0 --port {ENGINE_PORT} --tensor-parallel-size {cluster.gpus_per_engine} "
             f"--max-model-len {cluster.max_model_len} --gpu-memory-utilization {cluster.gpu_memory_utilization}")
    gpus = str(cluster.gpus_per_engine)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": {
            # A candidate engine runs only while a rollout needs it: scale it to 1 then.
            "replicas": 1 if role == "champion" else 0,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": dict(cluster.node_selector),
                    "tolerations": [dict(t) for t in cluster.tolerations],
                    "initContainers": [{
                        "name": "fetch-model", "image": cluster.front_image,
                        "command": ["nightshift", "fetch-model", "--alias", alias, "--dest", "/models"],
                        "env": [{"name": "NIGHTSHIFT_HOME", "value": "/var/lib/nightshift"},
                                {"name": "NIGHTSHIFT_REGISTERED_MODEL", "value": settings.registered_model},
                                *_secret_env(cluster.secret, "NIGHTSHIFT_MLFLOW_TRACKING_URI")],
                        "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                    }],
                    "containers": [{
                        "name": "vllm", "image": cluster.vllm_image,
                        "command": ["/bin/sh", "-c"], "args": [serve],
                        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
                        "resources": {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": gpus},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": gpus}},
                        "readinessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT},
                                           "periodSeconds": 5, "failureThreshold": 3},
                        "startupProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT},
                                         "periodSeconds": 10, "failureThreshold": 90},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT},
                                          "periodSeconds": 15, "failureThreshold": 4},
                        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                                         {"name": "dshm", "mountPath": "/dev/shm"}],
                    }],
                    "volumes": [{"name": "models", "emptyDir": {}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def _plain_deployment(name: str, namespace: str, labels: dict[str, str], replicas: int,
                      container: dict[str, Any]) -> dict[str, Any]:
    """Return a Deployment of one container that runs as a non-root user (the front, the MLflow server)."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": labels},
                         "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                                  "containers": [container]}},
        },
    }


def front(cluster: ServingCluster, settings: Settings) -> list[dict[str, Any]]:
    """Return the Deployment and Service of nightshift's front before the engines."""
    name = "nightshift-serving"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "front", **PART_OF}
    upstream = {role: f"http://{engine_name(role)}.{cluster.namespace}.svc:{ENGINE_PORT}/v1"
                for role in ("champion", "candidate")}
    env = [
        {"name": "NIGHTSHIFT_HOME", "value": "/var/lib/nightshift"},
        {"name": "NIGHTSHIFT_REGISTERED_MODEL", "value": settings.registered_model},
        {"name": "NIGHTSHIFT_SERVE_UPSTREAM", "value": upstream["champion"]},
        {"name": "NIGHTSHIFT_SERVE_UPSTREAM_CANDIDATE", "value": upstream["candidate"]},
        {"name": "NIGHTSHIFT_SERVE_MAX_CONCURRENT", "value": "64"},
        {"name": "NIGHTSHIFT_SERVE_MAX_QUEUE", "value": "256"},
        *_secret_env(cluster.secret, "NIGHTSHIFT_MLFLOW_TRACKING_URI", "NIGHTSHIFT_API_KEYS",
                     "NIGHTSHIFT_SERVE_REQUEST_LOG"),
    ]
    deployment = _plain_deployment(name, cluster.namespace, labels, cluster.front_replicas, {
        "name": "front", "image": cluster.front_image,
        "command": ["nightshift", "serve", "--host", "0.0.0.0", "--port", str(ENGINE_PORT)],
        "env": env,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": ENGINE_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": ENGINE_PORT}, "periodSeconds": 15},
    })
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels,
                     # Prometheus scrapes /metrics (needs the API key: see docs/deploy.md)
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                                     "prometheus.io/port": str(ENGINE_PORT)}},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    # More fronts while requests queue: nightshift_queue_depth, per pod, through the Prometheus Adapter's
    # custom metrics API (its rule in docs/deploy.md).
    autoscaler = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": cluster.front_replicas, "maxReplicas": cluster.front_max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": "nightshift_queue_depth"},
                "target": {"type": "AverageValue", "averageValue": str(cluster.queue_depth_target)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
    return [deployment, service, autoscaler]


def mlflow_server(cluster: ServingCluster) -> list[dict[str, Any]]:
    """Return the Deployment and Service of the shared MLflow tracking server: its backend store on PostgreSQL,
    its artifacts proxied to object storage (``--serve-artifacts``), both named by the ``nightshift-mlflow`` Secret
    (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for an
    S3-compatible store, MLFLOW_S3_ENDPOINT_URL)."""
    name = "nightshift-mlflow"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "registry", **PART_OF}
    serve = ('exec mlflow server --host 0.0.0.0 --port 5000 --workers 4 --backend-store-uri '
             '"$MLFLOW_BACKEND_STORE_URI" --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"')
    deployment = _plain_deployment(name, cluster.namespace, labels, 2, {
        "name": "mlflow", "image": cluster.front_image,
        "command": ["/bin/sh", "-c"], "args": [serve],
        "env": [*_secret_env("nightshift-mlflow", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
                             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"),
                {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"}],
        "ports": [{"name": "http", "containerPort": 5000}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 5000}, "periodSeconds": 30},
    })
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": 5000, "targetPort": "http"}]},
    }
    return [deployment, service]


def manifests(settings: Settings, cluster: ServingCluster | None = None) -> list[dict[str, Any]]:
    """Return every manifest beside Airflow's chart: both engines, the front (with its autoscaler), the MLflow
    server."""
    cluster = cluster or ServingCluster.from_settings(settings)
    return [*engine(cluster, settings, "champion"), *engine(cluster, settings, "candidate"), *front(cluster, settings),
            *mlflow_server(cluster)]
