"""docker-compose stack, proxy and images: the files agree with each other and with the service.

No Docker engine runs here; `docker compose config` (or Debian's docker-compose) validates
the files against the Compose schema when a compose client is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from service.config import Settings
from tests.deploy.helpers import DEPLOY, REPO, check_env_names

COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, str]:
    """container path -> repo path of the bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *_ = v.split(":")
        if src.startswith("./"):
            out[dst] = src
    return out


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu-override"])
def test_compose_config_accepts_the_files(files: list[Path]) -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose plugin or Debian's docker-compose) installed")
    args = [a for f in files for a in ("-f", str(f))]
    r = subprocess.run([*client, *args, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    scaled = subprocess.run(
        [*client, *args, "config", "--services"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert set(scaled.stdout.split()) == {"uniguard", "proxy", "prometheus", "grafana"}


def test_replicas_sit_behind_the_proxy() -> None:
    services = compose()["services"]
    guard, proxy = services["uniguard"], services["proxy"]
    port = Settings().port
    assert "ports" not in guard, "a published host port on uniguard would make --scale clash"
    assert [int(p) for p in guard["expose"]] == [port]
    check_env_names(guard.get("environment", {}), "docker-compose.yml uniguard")
    assert proxy["ports"] == [f"{port}:{port}"]
    conf = mounts(proxy)["/etc/nginx/nginx.conf"]
    text = (REPO / conf).read_text()
    assert re.search(rf"server\s+uniguard:{port}\s+resolve;", text), "the proxy must re-resolve the replicas"
    assert re.search(rf"listen\s+{port};", text)
    assert "127.0.0.11" in text  # Docker's embedded DNS
    assert proxy["depends_on"]["uniguard"]["condition"] == "service_healthy"
    assert text.count("{") == text.count("}")


def test_prometheus_scrapes_every_replica() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    folder = mounts(prom)["/etc/prometheus"]
    config = yaml.safe_load((REPO / folder / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["uniguard"] and sd["port"] == Settings().port and sd["type"] == "A"
    for rule_file in config["rule_files"]:
        assert (REPO / folder / rule_file).is_file()
    assert services["uniguard"]["environment"]["UNIGUARD_METRICS_PUBLIC"] == "true"


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    m = mounts(grafana)
    prov = REPO / m["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards" / "uniguard.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert dash_dir in m, "the dashboard provider reads a folder compose does not mount"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / m[dash_dir] / Path(home).name).is_file()
    import json

    dashboard = json.loads((REPO / m[dash_dir] / "uniguard.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}


def dockerfile_copies(path: Path) -> list[str]:
    out: list[str] = []
    for line in path.read_text().splitlines():
        m = re.match(r"COPY\s+(?!--from)(\S+(?:\s+\S+)*)\s+\S+$", line.strip())
        if m:
            out += m.group(1).split()
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles(name: str) -> None:
    path = REPO / name
    text = path.read_text()
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    for src in dockerfile_copies(path):
        assert (REPO / src).exists() or src == "models/default", f"{name}: COPY {src} does not exist"
        assert src.split("/")[0] not in ignored, f"{name}: COPY {src} is excluded by .dockerignore"
    assert f"EXPOSE {Settings().port}" in text and "UNIGUARD_HOST=0.0.0.0" in text
    env = dict(re.findall(r"(UNIGUARD_[A-Z_]+)=(\S+)", text))
    check_env_names(env, name)
    expected = "cuda" if name.endswith(".gpu") else "cpu"
    assert env["UNIGUARD_PROVIDER"] == expected


def test_gpu_image_never_installs_the_cpu_onnxruntime() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_requirements", DEPLOY / "gpu_requirements.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reqs = mod.gpu_requirements(REPO / "pyproject.toml")
    names = [mod.requirement_name(r) for r in reqs]
    assert "onnxruntime" not in names and "onnxruntime-gpu" in names
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert len(reqs) == len(project["dependencies"]) - 1 + len(project["optional-dependencies"]["gpu"])
    assert "gpu_requirements.py" in (REPO / "Dockerfile.gpu").read_text()
