"""A request's memory is freed when it is answered, without HTTP.

The live-server figure (RSS back down after a big request) is in ``test_request_cost``;
these pin the two causes found: a finished request's token rows were still referenced by
the inference thread until the next batch, and glibc kept the freed pages (now
``malloc_trim`` after a big request, ``service.core.heap``).
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from service.contract.policy import Policy
from service.core import engine as engine_module
from service.core import heap as memory
from service.core.batcher import MicroBatcher
from service.core.errors import ApiError, ErrorCode
from service.model.onnx_model import OnnxModel
from tests.service.conftest import running_engine

TEXTS = [f"text number {i}" for i in range(40)]


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees memory: what these tests check is that nothing waits for a gc pass."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _track(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """Weak references to the token rows (EncodedWindows) of every submission."""
    refs: list[weakref.ref[Any]] = []
    submit = MicroBatcher.submit

    async def tracking_submit(self: MicroBatcher, work: Any) -> Any:
        refs.append(weakref.ref(getattr(work, "windows", work)))
        return await submit(self, work)

    monkeypatch.setattr(MicroBatcher, "submit", tracking_submit)
    return refs


def _gone(refs: list[weakref.ref[Any]], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return all(r() is None for r in refs)


def test_answered_request_frees_its_token_rows(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy], monkeypatch: pytest.MonkeyPatch, no_cyclic_gc: None
) -> None:
    refs = _track(monkeypatch)

    async def main() -> None:
        async with running_engine(tiny_model, shipped_policies) as engine:
            result = await engine.classify(engine.resolve(["toxicity", "tax_advice"]), " ".join(TEXTS) * 5)
            assert sum(v.windows for v in result.verdicts) > 4
            del result
            await asyncio.sleep(0.05)  # the inference thread is idle again, waiting for work
            assert refs and _gone(refs), "the idle inference thread still holds the last request's rows"

    asyncio.run(main())


def test_request_refused_after_tokenising_frees_its_token_rows(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy], monkeypatch: pytest.MonkeyPatch, no_cyclic_gc: None
) -> None:
    refs: list[weakref.ref[Any]] = []
    prepare = MicroBatcher.prepare

    def tracking_prepare(self: MicroBatcher, windows: Any) -> Any:
        refs.append(weakref.ref(windows))
        return prepare(self, windows)

    monkeypatch.setattr(MicroBatcher, "prepare", tracking_prepare)

    async def main() -> None:
        # The throughput is measured on the first batch: then a budget of 4 windows refuses 80.
        async with running_engine(tiny_model, shipped_policies, window_budget_factor=1e-12, min_window_budget=4) as e:
            await e.classify(e.resolve("toxicity"), "warm-up")
            refs.clear()
            with pytest.raises(ApiError) as info:
                await e.classify_many(e.resolve(["toxicity", "tax_advice"]), TEXTS)
            assert info.value.code is ErrorCode.prompt_too_long
            del info
            assert refs and _gone(refs), "a refused request's rows wait for a gc pass (job <-> window cycle)"

    asyncio.run(main())


def test_big_request_gives_memory_back_once(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_malloc_trim(pad: int) -> int:
        calls.append(pad)
        return 1

    monkeypatch.setattr(memory, "_malloc_trim", fake_malloc_trim)
    monkeypatch.setattr(engine_module, "RELEASE_MEMORY_WINDOWS", 20)
    monkeypatch.setattr(memory, "RELEASE_DELAY_S", 0.05)

    async def main() -> None:
        async with running_engine(tiny_model, shipped_policies) as engine:
            policies = engine.resolve("toxicity")
            await engine.classify_many(policies, TEXTS[:10])  # 10 pairs: small, nothing to give back
            await asyncio.sleep(0.3)
            assert calls == []
            await asyncio.gather(*(engine.classify_many(policies, TEXTS) for _ in range(3)))  # big, together
            deadline = time.monotonic() + 5
            while not calls and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert calls == [0]  # malloc_trim(0): every arena, once for the three requests
