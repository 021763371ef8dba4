"""The GPU serving path's manifests (validated against the Kubernetes schema; no cluster here) and the engine
pod's init step, `nightshift fetch-model`, against a real registry."""

import os
import shlex

import kubernetes_validate
import pytest
import yaml

from helpers import home_registry, publish
from nightshift.serving.deploy import ENGINE_PORT, ServingCluster, engine_name, manifests

K8S_VERSION = "1.33"


def test_every_manifest_is_valid_and_the_front_points_at_the_engines(settings):
    docs = manifests(settings)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    champion = by[("Deployment", engine_name("champion"))]["spec"]
    pod = champion["template"]["spec"]
    assert champion["replicas"] == 1 and by[("Deployment", engine_name("candidate"))]["spec"]["replicas"] == 0
    init, vllm = pod["initContainers"][0], pod["containers"][0]
    assert init["command"] == ["nightshift", "fetch-model", "--alias", "champion", "--dest", "/models"]
    command = shlex.split(vllm["args"][0])
    assert command[:3] == ["exec", "vllm", "serve"] and command[3] == "/models/model"
    assert command[command.index("--served-model-name") + 1] == f"{settings.registered_model}-v$(cat /models/VERSION)"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Services select the pods they front, and the front's engine URLs name those Services.
    for role in ("champion", "candidate"):
        service = by[("Service", engine_name(role))]
        template = by[("Deployment", engine_name(role))]["spec"]["template"]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in
           by[("Deployment", "nightshift-serving")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NIGHTSHIFT_SERVE_UPSTREAM"] == f"http://{engine_name('champion')}.nightshift.svc:{ENGINE_PORT}/v1"
    assert env["NIGHTSHIFT_SERVE_UPSTREAM_CANDIDATE"].startswith(f"http://{engine_name('candidate')}.")
    assert "NIGHTSHIFT_API_KEYS" in env and env["NIGHTSHIFT_API_KEYS"] is None  # from the Secret, not inline


def test_tensor_parallel_engines_ask_for_as_many_gpus(settings):
    docs = manifests(settings, ServingCluster(gpus_per_engine=4))
    vllm = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == "4" and "--tensor-parallel-size 4" in vllm["args"][0]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    from nightshift.cli import main

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    umask = os.umask(0o022)
    os.umask(umask)
    monkeypatch.setattr("nightshift.cli.PRIVATE_UMASK", umask)
    return main


def test_fetch_model_puts_the_aliased_version_where_vllm_reads_it(cli, tmp_path, tiny_model, capsys):
    from nightshift.registry.rollout_state import Rollouts
    from nightshift.settings import load_settings

    registry = home_registry(load_settings())
    publish(registry, tiny_model, "one")
    v2 = publish(registry, tiny_model, "two", promote=False)
    dest = tmp_path / "models"
    assert cli(["fetch-model", "--alias", "candidate", "--dest", str(dest)]) == 1
    assert "carries the alias 'candidate'" in capsys.readouterr().err
    assert cli(["fetch-model", "--dest", str(dest)]) == 0
    assert (dest / "VERSION").read_text().strip() == "1"
    assert (dest / "model" / "config.json").is_file() and (dest / "model" / "tokenizer.json").is_file()
    Rollouts(registry).start(v2, "canary", 0.1)
    assert cli(["fetch-model", "--alias", "candidate", "--dest", str(dest)]) == 0
    assert (dest / "VERSION").read_text().strip() == "2"
    assert sorted(p.name for p in dest.iterdir()) == ["VERSION", "model"]


def test_deploy_manifests_writes_what_kubectl_applies(cli, tmp_path):
    out = tmp_path / "serving.yaml"
    assert cli(["deploy-manifests", "--out", str(out), "--vllm-image", "vllm/vllm-openai:v0.33.0"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"] * 3 + ["HorizontalPodAutoscaler", "Deployment",
                                                                          "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_front_scales_on_queue_depth_and_the_mlflow_server_proxies_its_artifacts(settings):
    by = {(d["kind"], d["metadata"]["name"]): d for d in manifests(settings)}
    hpa = by[("HorizontalPodAutoscaler", "nightshift-serving")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "nightshift-serving" and hpa["minReplicas"] == 2
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "nightshift_queue_depth"
    from nightshift.serving.metrics import ServingMetrics

    assert "\nnightshift_queue_depth " in ServingMetrics().exposition().decode()  # what the HPA's adapter reads
    mlflow = by[("Deployment", "nightshift-mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = shlex.split(mlflow["args"][0])
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    assert {e["name"] for e in mlflow["env"]} >= {"MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY"}
    assert all("value" not in e for e in mlflow["env"] if e["name"].startswith(("AWS_", "MLFLOW_BACKEND")))
