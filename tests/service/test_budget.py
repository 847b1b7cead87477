"""The admission budget: work that cannot be scored before its deadline is refused at once
(engine level, real tiny model; over HTTP: test_limits_http)."""

from __future__ import annotations

import asyncio

import pytest

from service.contract.policy import Policy
from service.core.engine import Engine
from service.core.errors import ApiError, ErrorCode
from service.model.onnx_model import OnnxModel
from tests.service.conftest import Gate, running_engine

# A factor this small leaves the floor as the whole budget: deterministic whatever the CPU.
TINY_FACTOR = 1e-12


def prompt_with_windows(engine: Engine, policy_id: str, windows: int) -> str:
    policy = engine.policies[policy_id]
    text = "alpha"
    while engine.model.encoder.encode(policy, text).count < windows:
        text += " alpha beta gamma delta"
    assert engine.model.encoder.encode(policy, text).count == windows
    return text


def test_over_budget_is_413_within_budget_is_scored(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    async def main() -> None:
        async with running_engine(
            tiny_model, shipped_policies, window_budget_factor=TINY_FACTOR, min_window_budget=4
        ) as engine:
            await engine.warm_up()  # the first throughput measurement
            assert engine.batcher.throughput is not None
            ok = await engine.classify(engine.resolve("toxicity"), prompt_with_windows(engine, "toxicity", 4))
            assert ok.verdicts[0].windows == 4
            with pytest.raises(ApiError) as info:
                await engine.classify(engine.resolve("toxicity"), prompt_with_windows(engine, "toxicity", 5))
            err = info.value
            assert err.code is ErrorCode.prompt_too_long and err.status == 413
            assert err.details["limit"] == "window_budget"
            assert err.details["windows"] == 5 and err.details["budget"] == 4
            assert err.details["tokens"] > err.details["budget_tokens"] == 4 * tiny_model.manifest.max_length
            assert err.details["deadline_s"] == 10 and err.details["throughput_tokens_per_s"] > 0
            # The windows of all policies of one request count together.
            with pytest.raises(ApiError) as info:
                await engine.classify(
                    engine.resolve(["toxicity", "prompt_injection"]), prompt_with_windows(engine, "toxicity", 3)
                )
            assert info.value.code is ErrorCode.prompt_too_long and info.value.details["windows"] >= 6
            assert engine.batcher.depth == 0  # nothing was queued for the refused requests

    asyncio.run(main())


def test_fits_alone_but_not_behind_the_queue_is_429(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    gate = Gate(tiny_model)

    async def main() -> None:
        async with running_engine(
            tiny_model, shipped_policies, window_budget_factor=TINY_FACTOR, min_window_budget=6
        ) as engine:
            await engine.warm_up()
            engine.batcher._run_fn = gate.run
            prompt = prompt_with_windows(engine, "toxicity", 4)
            first = asyncio.create_task(engine.classify(engine.resolve("toxicity"), prompt))
            await asyncio.to_thread(gate.entered.wait, 10)  # its 4 windows are in flight
            with pytest.raises(ApiError) as info:
                await engine.classify(engine.resolve("toxicity"), prompt)
            err = info.value
            assert err.code is ErrorCode.queue_full and err.headers["Retry-After"]
            assert err.details["reason"] == "window_budget" and err.details["ahead_tokens"] > 0
            short = asyncio.create_task(engine.classify(engine.resolve("toxicity"), "hi"))  # fits behind it
            await asyncio.sleep(0.01)
            gate.open.set()
            assert (await first).verdicts[0].windows == 4
            assert (await short).verdicts[0].windows == 1

    asyncio.run(main())


def test_budget_off_and_before_any_measurement(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    async def main() -> None:
        async with running_engine(tiny_model, shipped_policies, window_budget_factor=0, min_window_budget=1) as engine:
            await engine.warm_up()
            c = await engine.classify(engine.resolve("toxicity"), prompt_with_windows(engine, "toxicity", 3))
            assert c.verdicts[0].windows == 3  # factor 0: no budget
        async with running_engine(
            tiny_model, shipped_policies, window_budget_factor=TINY_FACTOR, min_window_budget=1
        ) as engine:
            assert engine.batcher.throughput is None  # nothing measured yet: nothing refused
            c = await engine.classify(engine.resolve("toxicity"), prompt_with_windows(engine, "toxicity", 3))
            assert c.verdicts[0].windows == 3

    asyncio.run(main())
