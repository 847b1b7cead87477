"""Batch forming through the batcher: length bucketing, the token bound, continuous batching,
and tokenisation that does not wait behind inference (real tiny model, no HTTP). The
queue's policy on its own: tests/service/test_fair_queue.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.contract.policy import EncodedWindows, Policy
from service.core.batcher import MicroBatcher
from service.core.engine import THREADED_TOKENIZE_CHARS
from service.model.onnx_model import OnnxModel
from tests.service.conftest import Gate, running_engine


def mixed_submissions(model: OnnxModel, policies: dict[str, Policy]) -> list[EncodedWindows]:
    short = [model.encoder.encode(policies["toxicity"], f"hi {i}") for i in range(6)]
    long_prompt = " ".join(f"token{i}" for i in range(300))
    longs = [model.encoder.encode(policies["prompt_injection"], long_prompt + str(i)) for i in range(2)]
    tax_question = "How do I file my taxes as a freelancer in Germany this year? " * 2
    mid = [model.encoder.encode(policies["tax_advice"], tax_question) for _ in range(4)]
    subs = [
        short[0],
        longs[0],
        mid[0],
        short[1],
        mid[1],
        short[2],
        longs[1],
        short[3],
        mid[2],
        short[4],
        mid[3],
        short[5],
    ]
    assert any(s.count > 2 for s in subs)  # multi-window jobs are in the mix
    return subs


def run_mixed(
    model: OnnxModel, policies: dict[str, Policy], max_padding: float
) -> tuple[MicroBatcher, list[np.ndarray]]:
    gate = Gate(model)
    subs = mixed_submissions(model, policies)

    async def main() -> tuple[MicroBatcher, list[np.ndarray]]:
        b = MicroBatcher(gate.run, max_batch_size=8, max_padding=max_padding, pad_id=model.pad_id)
        await b.start()
        first = asyncio.create_task(b.submit(model.encoder.encode(policies["toxicity"], "held")))
        await asyncio.to_thread(gate.entered.wait, 10)  # the thread holds a batch: the rest queue up
        tasks = [asyncio.create_task(b.submit(s)) for s in subs]
        await asyncio.sleep(0.01)
        gate.open.set()
        results = await asyncio.gather(*tasks)
        await first
        await b.stop()
        return b, [r.probabilities for r in results]

    return asyncio.run(main())


def test_bucketing_cuts_padding_and_keeps_every_answer_in_place(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy]
) -> None:
    bucketed, probs = run_mixed(tiny_model, shipped_policies, max_padding=0.2)
    fifo, probs_fifo = run_mixed(tiny_model, shipped_policies, max_padding=1.0)
    queued = list(bucketed.history)[1:]  # after the held batch
    assert all(r.size <= 8 for r in queued)
    assert all(r.padding <= 0.2 + 1e-9 for r in queued)  # no row padded by more than 20 %
    padded = sum(r.padded_tokens for r in queued)
    padded_fifo = sum(r.padded_tokens for r in list(fifo.history)[1:])
    assert padded < padded_fifo  # less computed padding than packing in arrival order
    # Windows were reordered across jobs: each probability must still land on its own window.
    subs = mixed_submissions(tiny_model, shipped_policies)
    for enc, got in zip(subs, probs, strict=True):
        rows = zip(enc.input_ids, enc.attention_mask, enc.token_type_ids, strict=True)
        alone = np.array([tiny_model.run(ids[None], m[None], t[None])[0] for ids, m, t in rows])
        assert got.shape == (enc.count,)
        np.testing.assert_allclose(got, alone, atol=2e-3)  # int8: batch-mates nudge activation scales
    for a, b in zip(probs, probs_fifo, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_token_bound_splits_batches(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(400))
    enc = tiny_model.encoder.encode(shipped_policies["prompt_injection"], long_prompt)
    assert enc.count >= 6

    async def main() -> MicroBatcher:
        b = MicroBatcher(
            tiny_model.run, max_batch_size=32, max_batch_tokens=2 * tiny_model.manifest.max_length, max_wait_ms=0
        )
        await b.start()
        r = await b.submit(enc)
        await b.stop()
        assert r.probabilities.shape == (enc.count,)
        return b

    b = asyncio.run(main())
    assert all(r.padded_tokens <= 2 * tiny_model.manifest.max_length for r in b.history)
    assert sum(r.size for r in b.history) == enc.count


@pytest.mark.parametrize(("max_wait_ms", "lone_wait_ok"), [(0.0, lambda s: s < 0.05), (150.0, lambda s: s >= 0.14)])
def test_lone_request_waits_only_when_told(
    tiny_model: OnnxModel,
    shipped_policies: dict[str, Policy],
    max_wait_ms: float,
    lone_wait_ok: Callable[[float], bool],
) -> None:
    """Continuous batching (max_wait 0): an idle model takes a lone window at once."""
    enc = tiny_model.encoder.encode(shipped_policies["toxicity"], "hello")

    async def main() -> list[float]:
        b = MicroBatcher(tiny_model.run, max_wait_ms=max_wait_ms)
        await b.start()
        waits = []
        for _ in range(3):
            waits.append((await b.submit(enc)).queue_s)
            await asyncio.sleep(0.01)
        await b.stop()
        return waits

    waits = asyncio.run(main())
    assert lone_wait_ok(min(waits)), waits


def test_tokenising_does_not_wait_behind_inference(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    """A long prompt is tokenised in a worker thread while a batch holds the model."""
    gate = Gate(tiny_model)
    model = tiny_model
    long_prompt = "tell me about the history of rome " * (THREADED_TOKENIZE_CHARS // 20)

    async def body() -> None:
        async with running_engine(model, shipped_policies, max_wait_ms=0) as engine:
            engine.batcher._run_fn = gate.run
            held = asyncio.create_task(engine.classify(engine.resolve("toxicity"), "first"))
            await asyncio.to_thread(gate.entered.wait, 10)
            started = time.perf_counter()
            long_task = asyncio.create_task(engine.classify(engine.resolve("prompt_injection"), long_prompt))
            while engine.batcher.depth == 0:  # tokenised and queued, though the model is still busy
                assert time.perf_counter() - started < 10 and not gate.open.is_set()
                await asyncio.sleep(0.005)
            assert not held.done()
            gate.open.set()
            first, second = await asyncio.gather(held, long_task)
            assert first.verdicts[0].windows == 1 and second.verdicts[0].windows > 1

    asyncio.run(body())
