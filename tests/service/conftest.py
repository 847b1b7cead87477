"""Service test helpers: a loaded tiny model and an engine running on its own batcher."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.batching import MicroBatcher
from service.config import Settings
from service.engine import Engine
from service.inference import OnnxModel
from service.metrics import Metrics
from service.policy import DEFAULT_POLICIES_DIR, Policy, load_policies


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> OnnxModel:
    return OnnxModel.load(tiny_model_dir, threads=1)


@pytest.fixture(scope="session")
def shipped_policies() -> dict[str, Policy]:
    return load_policies(DEFAULT_POLICIES_DIR)


@contextlib.asynccontextmanager
async def running_engine(model: OnnxModel, policies: dict[str, Policy], **overrides: object) -> AsyncIterator[Engine]:
    """An Engine with a started batcher (stopped on exit), for use inside asyncio.run."""
    settings = Settings(model_dir=model.folder, threads=1, **overrides)  # type: ignore[arg-type]
    metrics = Metrics()
    batcher = MicroBatcher(
        model.run, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue, pad_id=model.pad_id, observer=metrics,
    )
    await batcher.start()
    try:
        yield Engine(model, batcher, policies, settings, metrics)
    finally:
        await batcher.stop()
