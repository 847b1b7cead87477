"""What the deploy tests compare the manifests against: the real app and settings."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def app_status(tmp_path: Path, paths: list[str]) -> dict[str, int]:
    """GET each path on the real app (no model loaded): 404 means no such route."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    client = TestClient(create_app(Settings(model_dir=tmp_path, threads=1)))  # no lifespan: nothing loads
    return {path: client.get(path).status_code for path in paths}


def check_env_names(env: dict[str, str], where: str) -> None:
    """Every UNIGUARD_* variable a manifest sets must be a real setting (a typo is silently ignored)."""
    fields = set(Settings.model_fields)
    for name, value in env.items():
        if name.startswith("UNIGUARD_"):
            assert name.removeprefix("UNIGUARD_").lower() in fields, f"{where}: {name} is not a UniGuard setting"
            Settings.model_validate({name.removeprefix("UNIGUARD_").lower(): value})  # and its value parses
