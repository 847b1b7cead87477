"""Sensitivity levels over real HTTP: per-request level, the server default, the thresholds listed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.model.manifest import MANIFEST_FILE
from tests.harness.live_server import Server, assert_error, serve

# strict flags every prompt, permissive none: each level's verdict is known whatever the tiny model scores.
LEVELS = {"strict": 0.0, "balanced": 0.5, "permissive": 1.0}


@pytest.fixture(scope="module")
def levelled_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("levels") / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for entry in manifest["policies"].values():
        entry["threshold"] = LEVELS["balanced"]
        entry["sensitivity"] = LEVELS
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def server(levelled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("s") / "log", UNIGUARD_MODEL_DIR=str(levelled_model)) as s:
        s.wait("/readyz", 200)
        yield s


def classify(url: str, **extra: object) -> httpx.Response:
    body = {"policy_id": "toxicity", "prompt": "You are all wonderful people.", **extra}
    return httpx.post(f"{url}/v1/classify", json=body, timeout=30)


@pytest.mark.parametrize("level", ["strict", "balanced", "permissive"])
def test_a_request_picks_its_level_and_the_answer_says_which(server: Server, level: str) -> None:
    r = classify(server.url, sensitivity=level)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sensitivity"] == level and body["threshold"] == LEVELS[level]
    if level == "strict":
        assert body["unsafe"] is True
    if level == "permissive":
        assert body["unsafe"] is False


def test_without_a_level_the_default_is_balanced_and_lists_carry_it(server: Server) -> None:
    single = classify(server.url).json()
    assert single["sensitivity"] == "balanced" and single["threshold"] == 0.5
    many = classify(server.url, policy_id=["toxicity", "content_safety"], sensitivity="strict").json()
    assert many["sensitivity"] == "strict" and all(v["threshold"] == 0.0 and v["unsafe"] for v in many["results"])


@pytest.mark.parametrize("bad", ["paranoid", "STRICT", 1, None])
def test_an_unknown_level_is_a_422(server: Server, bad: object) -> None:
    r = classify(server.url, sensitivity=bad)
    if bad is None:  # null means "the server's default"
        assert r.status_code == 200
        return
    assert_error(r, 422, "invalid_request")


def test_policies_list_every_level(server: Server) -> None:
    policies = httpx.get(f"{server.url}/v1/policies", timeout=30).json()["policies"]
    toxicity = next(p for p in policies if p["id"] == "toxicity")
    assert toxicity["thresholds"] == LEVELS and toxicity["sensitivity"] == "balanced"


def test_the_server_default_is_a_setting(levelled_model: Path, tmp_path: Path) -> None:
    with serve(tmp_path / "log", UNIGUARD_MODEL_DIR=str(levelled_model), UNIGUARD_SENSITIVITY="strict") as s:
        s.wait("/readyz", 200)
        body = classify(s.url).json()
        assert body["sensitivity"] == "strict" and body["unsafe"] is True and body["threshold"] == 0.0
        listed = httpx.get(f"{s.url}/v1/policies", timeout=30).json()["policies"]
        assert all(p["threshold"] == 0.0 for p in listed if p["trained"])
