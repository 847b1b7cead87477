"""Reload safety: a policies folder holding something that is not a regular file, or a load
whose reads never return, fails the reload promptly (UNIGUARD_RELOAD_TIMEOUT_S); the lock is
released and the old version keeps serving. Driven through POST /admin/reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import service.contract.policy
from service.config import Settings
from service.contract.policy import DEFAULT_POLICIES_DIR
from service.core import runtime as runtime_module
from service.core.runtime import Runtime
from service.http.app import create_app
from tests.harness.live_server import Server, assert_error, serve

RELOAD_TIMEOUT_S = 2.0
PROMPT_WITHIN_S = 5.0  # generous: the reload fails within this; before the fix it never returned
CLIENT_TIMEOUT_S = 20.0

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture()
def folders(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    model, policies = tmp_path / "model", tmp_path / "policies"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(DEFAULT_POLICIES_DIR, policies)
    return model, policies


@pytest.fixture()
def server(folders: tuple[Path, Path], tmp_path: Path) -> Iterator[Server]:
    model, policies = folders
    with serve(
        tmp_path / "server.log",
        UNIGUARD_MODEL_DIR=str(model),
        UNIGUARD_POLICIES_DIR=str(policies),
        UNIGUARD_ADMIN_ENABLED="true",
        UNIGUARD_RELOAD_TIMEOUT_S=str(RELOAD_TIMEOUT_S),
    ) as s:
        s.wait("/readyz", 200)
        yield s


def _reload(server: Server) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.post(server.url + "/admin/reload", timeout=CLIENT_TIMEOUT_S)
    return r, time.monotonic() - started


def _still_serving(server: Server, model: str) -> None:
    assert httpx.get(server.url + "/readyz").json()["model"] == model
    r = httpx.post(server.url + "/v1/classify", json={"policy_id": "toxicity", "prompt": "hi"}, timeout=10)
    assert r.status_code == 200 and r.json()["model"] == model


@contextlib.contextmanager
def _fifo(path: Path) -> Iterator[Path]:
    """A FIFO at ``path``; on exit any reader blocked on it gets end-of-file, and it is removed."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        path.unlink()


def test_fifo_named_yaml_in_policies_fails_the_reload_at_once(server: Server, folders: tuple[Path, Path]) -> None:
    _, policies = folders
    serving = httpx.get(server.url + "/readyz").json()["model"]
    with _fifo(policies / "zz_fifo.yaml"):
        r, elapsed = _reload(server)
        err = assert_error(r, 422, "reload_failed")
        assert "not a regular file" in err["message"] and "zz_fifo.yaml" in err["message"]
        assert elapsed < PROMPT_WITHIN_S
        _still_serving(server, serving)
    r, _ = _reload(server)  # the lock was released: the next reload runs and succeeds
    assert r.status_code == 200, r.text


def test_a_reload_that_cannot_finish_times_out_and_releases_the_lock(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never returns (a dead network mount): the model folder's files and the policy
    files are checked to be regular files, so the hang is simulated in the policy loader; the
    runtime, its lock and the admin route are the real ones (in process, over ASGI)."""
    model, policies = folders
    stuck = threading.Event()  # set: the loader is stuck; release: let it return
    release = threading.Event()
    real_load = service.contract.policy.load_policies

    def load_policies(directory: Path) -> dict:
        if (Path(directory) / "STUCK").exists():
            stuck.set()
            release.wait(30)
        return real_load(directory)

    monkeypatch.setattr(runtime_module, "load_policies", load_policies)
    settings = Settings(
        model_dir=model, policies_dir=policies, threads=1, admin_enabled=True, reload_timeout_s=RELOAD_TIMEOUT_S
    )

    async def main() -> None:
        app = create_app(settings)
        runtime: Runtime = app.state.runtime
        await runtime.load()
        serving = runtime.engine
        assert serving is not None
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=CLIENT_TIMEOUT_S) as c:
            (policies / "STUCK").touch()
            started = time.monotonic()
            # Two reloads at once: the second waits for the lock, then times out on its own.
            first, second = await asyncio.wait_for(
                asyncio.gather(c.post("/admin/reload"), c.post("/admin/reload")), CLIENT_TIMEOUT_S
            )
            elapsed = time.monotonic() - started
            for r in (first, second):
                err = assert_error(r, 422, "reload_failed")
                assert "timed out" in err["message"] and err["details"]["serving"] == serving.model_id
            assert stuck.is_set() and 2 * RELOAD_TIMEOUT_S * 0.9 <= elapsed < 2 * RELOAD_TIMEOUT_S + PROMPT_WITHIN_S
            r = await c.post("/v1/classify", json={"policy_id": "toxicity", "prompt": "hi"})
            assert r.status_code == 200 and r.json()["model"] == serving.model_id
            (policies / "STUCK").unlink()
            release.set()  # the abandoned loads may end now (asyncio.run waits for its worker threads)
            r = await c.post("/admin/reload")  # the lock is free again
            assert r.status_code == 200, r.text
        await runtime.shutdown()

    try:
        asyncio.run(main())
    finally:
        release.set()
