"""Kubernetes manifests parse and agree with the service: port, probes, metrics path, settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.config import Settings
from tests.deploy.helpers import DEPLOY, app_status, check_env_names

K8S = DEPLOY / "k8s"


def load(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs, f"{path} is empty"
    for d in docs:
        assert {"apiVersion", "kind"} <= d.keys(), f"{path}: not a Kubernetes object"
    return docs


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, dict] = {}
    for rel in kustomization["resources"]:
        for doc in load(K8S / rel):
            out[doc["kind"]] = doc
    for doc in load(K8S / "servicemonitor.yaml"):
        out[doc["kind"]] = doc
    return out


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_every_manifest_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        load(path)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {
        d["kind"]
        for rel in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        for d in load(K8S / rel)
    }


def test_deployment_matches_the_service(objects: dict[str, dict], tmp_path: Path) -> None:
    dep = objects["Deployment"]
    c = container(dep)
    env = {e["name"]: e["value"] for e in c["env"]}
    check_env_names(env, "deployment.yaml")
    settings = Settings.model_validate({k.removeprefix("UNIGUARD_").lower(): v for k, v in env.items()})
    (port,) = c["ports"]
    assert port["containerPort"] == settings.port and settings.host == "0.0.0.0"
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    status = app_status(tmp_path, [ready["path"], live["path"], ann["prometheus.io/path"]])
    # Liveness answers while the model is not loaded; readiness says 503 until it is.
    assert status == {"/healthz": 200, "/readyz": 503, "/metrics": 200}, status
    assert ready["port"] == live["port"] == port["name"]
    # Threads = the CPU limit (os.cpu_count() would see the node).
    assert settings.threads == int(c["resources"]["limits"]["cpu"])
    # Scrape annotations name the real port and metrics route.
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == settings.port
    assert settings.metrics_public  # scrapers send no key
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Graceful stop fits in the grace period: preStop sleep + drain (request timeout + 1 s).
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + settings.request_timeout_s + 1


def test_service_hpa_pdb_and_servicemonitor_point_at_the_deployment(objects: dict[str, dict]) -> None:
    dep, svc, hpa, pdb, sm = (
        objects[k]
        for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor")
    )
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    port = container(dep)["ports"][0]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (sp,) = svc["spec"]["ports"]
    assert sp["targetPort"] in (port["name"], port["containerPort"]) and sp["port"] == port["containerPort"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], dep["apiVersion"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == sp["name"] and ep["path"] == "/metrics"


def test_gpu_overlay(objects: dict[str, dict]) -> None:
    kust = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../"]
    (patch_ref,) = kust["patches"]
    (patch,) = load(K8S / "gpu" / patch_ref["path"])
    assert patch["kind"] == "Deployment" and patch["metadata"]["name"] == objects["Deployment"]["metadata"]["name"]
    c = container(patch)
    assert c["name"] == container(objects["Deployment"])["name"]  # strategic merge by container name
    env = {e["name"]: e["value"] for e in c["env"]}
    check_env_names(env, "gpu/deployment-gpu.yaml")
    assert env["UNIGUARD_PROVIDER"] == "cuda" and c["image"].endswith(":gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
