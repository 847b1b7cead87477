"""The micro-batcher driving the real tiny model (no HTTP)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.contract.policy import EncodedWindows, Policy
from service.core.batcher import BatcherClosed, MicroBatcher, QueueFull
from service.model.onnx_model import OnnxModel
from tests.service.conftest import Gate


def windows(model: OnnxModel, policy: Policy, prompt: str) -> EncodedWindows:
    return model.encoder.encode(policy, prompt)


async def wait_entered(gate: Gate) -> None:
    await asyncio.to_thread(gate.entered.wait, 10)


def test_concurrent_submissions_share_one_batch(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["toxicity"]

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(tiny_model.run, max_batch_size=32, max_wait_ms=50)
        await b.start()
        results = await asyncio.gather(*(b.submit(windows(tiny_model, policy, f"prompt {i}")) for i in range(5)))
        alone = await b.submit(windows(tiny_model, policy, "prompt 3"))
        await b.stop()
        assert [r.size for r in b.history] == [5, 1]
        assert all(r.queue_s >= 0 and r.inference_s > 0 for r in results)
        return [r.probabilities for r in results] + [alone.probabilities]

    probs = asyncio.run(main())
    assert all(p.shape == (1,) and 0 <= p[0] <= 1 for p in probs)
    assert abs(probs[3][0] - probs[5][0]) < 1e-3  # same input alone or batched (int8: see test_inference)


def test_max_batch_size_and_multi_window_jobs(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["prompt_injection"]
    long_prompt = " ".join(f"word{i}" for i in range(400))

    async def main() -> None:
        b = MicroBatcher(tiny_model.run, max_batch_size=8, max_wait_ms=20)
        await b.start()
        subs = [windows(tiny_model, policy, f"short {i}") for i in range(10)]
        subs.append(windows(tiny_model, policy, long_prompt))
        total = sum(s.count for s in subs)
        assert subs[-1].count > 8  # the long prompt alone spans several batches
        results = await asyncio.gather(*(b.submit(s) for s in subs))
        await b.stop()
        sizes = [r.size for r in b.history]
        assert max(sizes) <= 8 and sum(sizes) == total
        assert sizes.count(8) >= total // 8
        assert [len(r.probabilities) for r in results] == [s.count for s in subs]
        assert b.depth == 0

    asyncio.run(main())


def test_queue_full_is_immediate(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["toxicity"]
    gate = Gate(tiny_model)

    async def main() -> None:
        b = MicroBatcher(gate.run, max_batch_size=1, max_wait_ms=0, max_queue=3)
        await b.start()
        running = asyncio.create_task(b.submit(windows(tiny_model, policy, "a")))
        await wait_entered(gate)  # the worker holds "a"; the queue is empty again
        queued = [asyncio.create_task(b.submit(windows(tiny_model, policy, f"q{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        assert b.depth == 3
        with pytest.raises(QueueFull):
            await b.submit(windows(tiny_model, policy, "one too many"))
        gate.open.set()
        await asyncio.gather(running, *queued)
        await b.stop()
        assert b.depth == 0

    asyncio.run(main())


def test_cancelled_caller_does_not_break_worker(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["toxicity"]
    gate = Gate(tiny_model)

    async def main() -> None:
        b = MicroBatcher(gate.run, max_batch_size=2, max_wait_ms=0)
        await b.start()
        in_flight = asyncio.create_task(b.submit(windows(tiny_model, policy, "in flight")))
        await wait_entered(gate)
        waiting = asyncio.create_task(b.submit(windows(tiny_model, policy, "waiting")))
        kept = asyncio.create_task(b.submit(windows(tiny_model, policy, "kept")))
        await asyncio.sleep(0)
        in_flight.cancel()  # cancelled while its batch runs
        waiting.cancel()  # cancelled while queued: its window must never run
        await asyncio.sleep(0)
        assert b.depth == 1
        gate.open.set()
        result = await kept
        assert result.probabilities.shape == (1,)
        for t in (in_flight, waiting):
            with pytest.raises(asyncio.CancelledError):
                await t
        again = await b.submit(windows(tiny_model, policy, "after"))
        assert again.probabilities.shape == (1,)
        await b.stop()
        assert [r.size for r in b.history] == [1, 1, 1]

    asyncio.run(main())


def test_failing_batch_fails_only_its_own_callers(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["toxicity"]
    poison = tiny_model.encoder._tokenizer.token_to_id("poison")

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        if (ids == poison).any():
            raise RuntimeError("bad batch")
        return tiny_model.run(ids, mask, types)

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=1, max_wait_ms=0)
        await b.start()
        good, bad, good2 = await asyncio.gather(
            b.submit(windows(tiny_model, policy, "fine")),
            b.submit(windows(tiny_model, policy, "poison")),
            b.submit(windows(tiny_model, policy, "also fine")),
            return_exceptions=True,
        )
        assert isinstance(bad, RuntimeError)
        assert not isinstance(good, BaseException) and not isinstance(good2, BaseException)
        await b.stop()

    asyncio.run(main())


def test_stop_drains_then_refuses(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    policy = shipped_policies["toxicity"]

    async def main() -> None:
        b = MicroBatcher(tiny_model.run, max_batch_size=2, max_wait_ms=1000)
        await b.start()
        tasks = [asyncio.create_task(b.submit(windows(tiny_model, policy, f"p{i}"))) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()  # does not wait out max_wait, does not drop queued work
        results = await asyncio.gather(*tasks)
        assert len(results) == 5
        with pytest.raises(BatcherClosed):
            await b.submit(windows(tiny_model, policy, "late"))

    asyncio.run(main())
