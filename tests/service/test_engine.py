"""Engine rules: thresholds, windows, limits and the error code of each failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from service.contract.policy import Policy
from service.core.batcher import BatchResult
from service.core.engine import Classification, Engine
from service.core.errors import ApiError, ErrorCode
from service.model.onnx_model import OnnxModel
from tests.service.conftest import running_engine

T = TypeVar("T")


def run_engine(
    model: OnnxModel, policies: dict[str, Policy], body: Callable[[Engine], Awaitable[T]], **overrides: Any
) -> T:
    async def main() -> T:
        async with running_engine(model, policies, **overrides) as engine:
            return await body(engine)

    return asyncio.run(main())


def with_thresholds(model: OnnxModel, **thresholds: float) -> OnnxModel:
    """The same session under a manifest with other calibrated thresholds."""
    manifest = model.manifest.model_copy(deep=True)
    for pid, t in thresholds.items():
        manifest.policies[pid].threshold = t
    return OnnxModel(model.folder, manifest, model.session, model.encoder)


def test_verdicts_use_calibrated_threshold(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    model = with_thresholds(tiny_model, toxicity=0.01, prompt_injection=0.99)

    async def body(engine: Engine) -> Classification:
        return await engine.classify(engine.resolve(["toxicity", "prompt_injection", "toxicity"]), "hello")

    c = run_engine(model, shipped_policies, body)
    assert [v.policy_id for v in c.verdicts] == ["toxicity", "prompt_injection"]  # deduplicated, in order
    tox, inj = c.verdicts
    assert (tox.threshold, tox.unsafe, tox.verdict, tox.trained) == (0.01, True, "unsafe", True)
    assert (inj.threshold, inj.unsafe, inj.verdict) == (0.99, False, "safe")
    assert c.unsafe and c.model == tiny_model.id
    assert c.timings.total_ms >= c.timings.inference_ms > 0


def test_changed_description_is_zero_shot(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    model = with_thresholds(tiny_model, toxicity=0.01)
    edited = shipped_policies["toxicity"].model_copy(update={"description": "Block rude prompts."})

    async def body(engine: Engine) -> Classification:
        return await engine.classify([edited], "hello", inline=True)

    (v,) = run_engine(model, shipped_policies, body).verdicts
    assert (v.threshold, v.trained) == (model.manifest.default_threshold, False)


def test_long_prompt_gets_many_windows_and_max_score(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy]
) -> None:
    prompt = " ".join(f"word{i}" for i in range(3000))

    async def body(engine: Engine) -> tuple[Classification, BatchResult]:
        c = await engine.classify(engine.resolve("prompt_injection"), prompt)
        windows = engine.model.encoder.encode(shipped_policies["prompt_injection"], prompt)
        r = await engine.batcher.submit(windows)
        return c, r

    c, r = run_engine(tiny_model, shipped_policies, body)
    (v,) = c.verdicts
    assert v.windows == r.probabilities.shape[0] > 10
    assert abs(v.score - float(r.probabilities.max())) < 1e-3


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda e: e.classify(e.resolve("toxicity"), "   \n"), ErrorCode.empty_prompt),
        (lambda e: e.classify(e.resolve("toxicity"), "x" * 2501), ErrorCode.prompt_too_long),
        (
            lambda e: e.classify([Policy(id="p", name="p", description="forbid " * 120)], "hi", inline=True),
            ErrorCode.policy_too_long,
        ),
        (
            lambda e: e.classify([Policy(id="p", name="p", description="forbidden " * 199)], "hi", inline=True),
            ErrorCode.policy_too_long,
        ),
        (lambda e: e.classify(e.resolve("toxicity"), "word " * 400), ErrorCode.prompt_too_long),  # > max_queue windows
    ],
)
def test_classify_errors(
    tiny_model: OnnxModel,
    shipped_policies: dict[str, Policy],
    call: Callable[[Engine], Awaitable[Classification]],
    code: ErrorCode,
) -> None:
    async def body(engine: Engine) -> None:
        with pytest.raises(ApiError) as info:
            await call(engine)
        assert info.value.code is code

    run_engine(tiny_model, shipped_policies, body, max_prompt_chars=2500, max_queue=4)


def test_resolve_errors(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    async def body(engine: Engine) -> None:
        with pytest.raises(ApiError) as info:
            engine.resolve(["toxicity", "nope"])
        assert info.value.code is ErrorCode.unknown_policy and info.value.details["unknown"] == ["nope"]
        with pytest.raises(ApiError) as info:
            engine.resolve(["toxicity", "prompt_injection", "tax_advice"])
        assert info.value.code is ErrorCode.too_many_policies
        assert len(engine.resolve(["toxicity"] * 5)) == 1
        with pytest.raises(ApiError) as info:
            engine.resolve([])
        assert info.value.code is ErrorCode.invalid_request

    run_engine(tiny_model, shipped_policies, body, max_policies_per_request=2)


def test_deadline_exceeded(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    async def body(engine: Engine) -> None:
        with pytest.raises(ApiError) as info:
            await engine.classify(engine.resolve("toxicity"), "hello")
        assert info.value.code is ErrorCode.deadline_exceeded
        await asyncio.sleep(0.3)
        assert engine.batcher.depth == 0  # the abandoned window was dropped

    # The window waits max_wait (200 ms) for batch-mates, past the 50 ms deadline.
    run_engine(tiny_model, shipped_policies, body, request_timeout_s=0.05, max_wait_ms=200)


def test_queue_full_maps_to_429(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    async def body(engine: Engine) -> None:
        first = asyncio.create_task(engine.classify(engine.resolve("toxicity"), "hello"))
        await asyncio.sleep(0.01)  # queued, waiting max_wait for batch-mates
        with pytest.raises(ApiError) as info:
            await engine.classify(engine.resolve("toxicity"), "hello again")
        assert info.value.code is ErrorCode.queue_full and info.value.headers["Retry-After"]
        await first

    run_engine(tiny_model, shipped_policies, body, max_queue=1, max_wait_ms=300)
