"""Service test helpers: a loaded tiny model, an engine running on its own batcher, and the
live service on the tiny model for a test module (``server``, ``client``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.contract.policy import DEFAULT_POLICIES_DIR, Policy, load_policies
from service.core.batcher import MicroBatcher
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.model.onnx_model import OnnxModel
from tests.harness.live_server import MAX_BODY, MAX_POLICIES, MAX_PROMPT_CHARS, Server, serve
from tests.harness.upstream import UpstreamServer


class Gate:
    """Wraps model.run so a test can hold the inference thread inside its first batch until opened."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.open = threading.Event()
        self.entered = threading.Event()

    def run(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.open.wait(10)
        return self.model.run(ids, mask, types)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    """A real chat-completions upstream on a loopback port, for the sidecar tests."""
    with UpstreamServer() as up:
        yield up


@pytest.fixture()
def fresh_upstream(upstream: UpstreamServer) -> UpstreamServer:
    """The module's upstream with no requests recorded: what a test asserts it received is its own.
    Modules that read the records say ``pytestmark = pytest.mark.usefixtures("fresh_upstream")``."""
    upstream.clear()
    return upstream


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel.load(tiny_model_dir, threads=1)


@pytest.fixture(scope="session")
def shipped_policies() -> dict[str, Policy]:
    return load_policies(DEFAULT_POLICIES_DIR)


@contextlib.asynccontextmanager
async def running_engine(model: OnnxModel, policies: dict[str, Policy], **overrides: Any) -> AsyncIterator[Engine]:
    """An Engine with a started batcher (stopped on exit), for use inside asyncio.run."""
    settings = Settings(model_dir=model.folder, threads=1, **overrides)
    metrics = Metrics()
    batcher = MicroBatcher(
        model.run,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        pad_id=model.pad_id,
        observer=metrics,
        workers=settings.inference_layout()[0],
    )
    await batcher.start()
    try:
        yield Engine(model, batcher, policies, settings, metrics)
    finally:
        await batcher.stop()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_MAX_WAIT_MS="10",
        UNIGUARD_MAX_BODY_BYTES=str(MAX_BODY),
        UNIGUARD_MAX_POLICIES_PER_REQUEST=str(MAX_POLICIES),
        UNIGUARD_MAX_PROMPT_CHARS=str(MAX_PROMPT_CHARS),
    ) as s:
        s.wait("/readyz", 200)
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
