"""Fair scheduling across requests, the throughput estimate, and several inference workers
(no HTTP; over HTTP: test_limits_http)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.contract.policy import EncodedWindows, Policy
from service.core.batcher import BatcherClosed, MicroBatcher, busy_rate, busy_time
from service.core.runtime import Runtime
from service.model.onnx_model import OnnxModel

LONG, SHORT = 11, 22  # marker token in column 0: which job a row belongs to


def fake_job(marker: int, count: int, length: int) -> EncodedWindows:
    """``count`` windows of ``length`` tokens; column 1 holds the window index (checked in the answers)."""
    rows = []
    for i in range(count):
        row = np.zeros(length, dtype=np.int64)
        row[0], row[1] = marker, i
        rows.append(row)
    return EncodedWindows(
        input_ids=rows,
        attention_mask=[np.ones(length, dtype=np.int64)] * count,
        token_type_ids=[np.zeros(length, dtype=np.int64)] * count,
    )


class SlowModel:
    """A fake model that records the jobs of every batch and holds its first batch until opened
    (and, with ``pause_after``, the batch after the first one holding that marker until resumed).
    Its probability for a row is a function of (marker, window index), so answers can be checked."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.batches: list[list[int]] = []  # marker of each row, one list per batch, in run order
        self.open = threading.Event()
        self.entered = threading.Event()
        self.resume = threading.Event()
        self.pause_after = pause_after
        self._lock = threading.Lock()

    def run(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.open.wait(10)
        with self._lock:
            pause = self.pause_after is not None and bool(self.batches) and self.pause_after in self.batches[-1]
        if pause:
            self.resume.wait(10)
        with self._lock:
            self.batches.append([int(m) for m in ids[:, 0]])
        return expected(ids[:, 0], ids[:, 1])


def expected(marker: np.ndarray | int, index: np.ndarray | int) -> np.ndarray:
    return np.asarray((np.asarray(marker) * 1000 + np.asarray(index)) % 997 / 997.0, dtype=np.float32)


def first_batch_with(model: SlowModel, marker: int) -> int:
    return next(i for i, rows in enumerate(model.batches) if marker in rows)


def test_short_request_is_not_stuck_behind_a_400_window_prompt() -> None:
    model = SlowModel(pause_after=SHORT)  # the long prompt's next batch waits until the test has looked

    async def main() -> None:
        b = MicroBatcher(model.run, max_batch_size=8, max_batch_tokens=8 * 128)
        await b.start()
        long = asyncio.create_task(b.submit(fake_job(LONG, 400, 128)))
        await asyncio.to_thread(model.entered.wait, 10)  # batch 0: the long prompt's first 8 windows, held
        short = asyncio.create_task(b.submit(fake_job(SHORT, 1, 16)))
        await asyncio.sleep(0)
        assert b.depth == 392 + 1
        model.open.set()
        result = await short
        assert not long.done()  # answered while the long prompt is still being scored
        # It ran in the batch right after the one in flight when it arrived.
        assert first_batch_with(model, SHORT) == 1
        assert model.batches[1] == [SHORT]  # not padded into the long prompt's batches (bucketing kept)
        np.testing.assert_allclose(result.probabilities, expected(SHORT, 0))
        model.resume.set()
        long_result = await long
        np.testing.assert_allclose(long_result.probabilities, expected(LONG, np.arange(400)))  # each window in place
        assert sum(len(rows) for rows in model.batches) == 401
        assert all(len(rows) <= 8 for rows in model.batches)
        await b.stop()
        assert b.depth == 0

    asyncio.run(main())


def test_old_job_is_not_starved_by_a_stream_of_new_ones() -> None:
    """New jobs go first, but a job already served anchors at least every other batch."""
    model = SlowModel()

    async def main() -> None:
        b = MicroBatcher(model.run, max_batch_size=1)
        await b.start()
        long = asyncio.create_task(b.submit(fake_job(LONG, 6, 64)))
        await asyncio.to_thread(model.entered.wait, 10)
        shorts = [asyncio.create_task(b.submit(fake_job(SHORT + i, 1, 16))) for i in range(5)]
        await asyncio.sleep(0)
        model.open.set()
        await asyncio.gather(long, *shorts)
        await b.stop()

    asyncio.run(main())
    order = [rows[0] for rows in model.batches]
    assert order == [LONG, SHORT, LONG, SHORT + 1, LONG, SHORT + 2, LONG, SHORT + 3, LONG, SHORT + 4, LONG]


def test_jobs_take_turns_and_share_batches() -> None:
    """Two long jobs of the same length: both get windows in every batch (round-robin candidates),
    each job's windows run oldest first."""
    model = SlowModel()

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(model.run, max_batch_size=4)
        await b.start()
        held = asyncio.create_task(b.submit(fake_job(99, 1, 64)))
        await asyncio.to_thread(model.entered.wait, 10)
        jobs = [asyncio.create_task(b.submit(fake_job(m, 20, 64))) for m in (LONG, LONG + 1)]
        await asyncio.sleep(0)
        model.open.set()
        await held
        results = await asyncio.gather(*jobs)
        await b.stop()
        return [r.probabilities for r in results]

    probs = asyncio.run(main())
    for rows in model.batches[1:]:
        assert sorted(rows) == [LONG, LONG, LONG + 1, LONG + 1]
    for m, p in zip((LONG, LONG + 1), probs, strict=True):
        np.testing.assert_allclose(p, expected(m, np.arange(20)))


def test_throughput_counts_overlapping_calls_once_and_work_ahead_is_the_fair_share() -> None:
    assert busy_rate([]) is None
    assert busy_rate([(0.0, 1.0, 100), (0.5, 1.5, 100), (3.0, 4.0, 100)]) == pytest.approx(300 / 2.5)
    model = SlowModel()

    async def main() -> None:
        b = MicroBatcher(model.run, max_batch_size=4)
        assert b.throughput is None
        await b.start()
        held = asyncio.create_task(b.submit(fake_job(99, 1, 100)))  # in flight: 100 padded tokens
        await asyncio.to_thread(model.entered.wait, 10)
        long = asyncio.create_task(b.submit(fake_job(LONG, 50, 100)))  # 5000 tokens queued
        await asyncio.sleep(0)
        assert b.work_ahead(10) == 100 + 10  # a short job shares the model with the long one
        assert b.work_ahead(1000) == 100 + 1000
        assert b.work_ahead(10_000) == 100 + 5000
        model.open.set()
        await asyncio.gather(held, long)
        assert b.throughput is not None and b.throughput > 0
        assert b.work_ahead(10) == 0
        await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_two_workers_score_like_one(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy], max_batch_size: int
) -> None:
    policy = shipped_policies["prompt_injection"]
    prompts = [f"prompt number {i} " * (1 + i % 7) for i in range(12)] + [" ".join(f"word{i}" for i in range(300))]
    subs = [tiny_model.encoder.encode(policy, p) for p in prompts]
    assert subs[-1].count > 2

    def score(workers: int) -> tuple[list[np.ndarray], MicroBatcher]:
        async def main() -> tuple[list[np.ndarray], MicroBatcher]:
            b = MicroBatcher(tiny_model.run, max_batch_size=max_batch_size, pad_id=tiny_model.pad_id, workers=workers)
            await b.start()
            results = await asyncio.gather(*(b.submit(s) for s in subs))
            await b.stop()
            return [r.probabilities for r in results], b

        return asyncio.run(main())

    one, _ = score(1)
    two, b = score(2)
    assert len(b._threads) == 2 and not any(t.is_alive() for t in b._threads)
    assert b.depth == 0 and not b._inflight
    assert sum(r.size for r in b.history) == sum(s.count for s in subs)
    for a, c in zip(one, two, strict=True):
        if max_batch_size == 1:  # every window alone: exactly the same computation
            np.testing.assert_array_equal(a, c)
        else:  # int8: batch-mates nudge activation scales (see test_batching_bucketing)
            np.testing.assert_allclose(a, c, atol=2e-3)


def test_two_workers_call_the_model_concurrently(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    """Both workers are inside ``run`` at once: the barrier only opens for two callers."""
    barrier = threading.Barrier(2, timeout=10)
    calls = 0
    lock = threading.Lock()

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        nonlocal calls
        with lock:
            calls += 1
            first_two = calls <= 2
        if first_two:
            barrier.wait()
        return tiny_model.run(ids, mask, types)

    enc = tiny_model.encoder.encode(shipped_policies["toxicity"], "hello")

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=1, workers=2)
        await b.start()
        results = await asyncio.gather(*(b.submit(enc) for _ in range(6)))
        await b.stop()
        assert all(r.probabilities.shape == (1,) for r in results)
        assert calls == 6 and not barrier.broken

    asyncio.run(main())


def test_a_job_in_two_concurrent_batches_counts_their_overlap_once() -> None:
    """Two workers run two batches of one request at the same time (the barrier opens only for
    both): its inference time is the union of the two calls, never more than its wall time
    (it was their sum: a 100,000-character prompt reported 10.2 s of inference in 5.2 s)."""
    assert busy_time([]) == 0.0
    assert busy_time([(0.0, 1.0), (0.5, 1.5), (3.0, 4.0)]) == pytest.approx(2.5)
    barrier = threading.Barrier(2, timeout=10)

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        barrier.wait()
        time.sleep(0.2)  # both calls inside run together for 0.2 s
        return np.full(ids.shape[0], 0.5, dtype=np.float32)

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=1, workers=2)
        await b.start()
        started = time.perf_counter()
        result = await b.submit(fake_job(LONG, 2, 8))
        wall = time.perf_counter() - started
        await b.stop()
        assert not barrier.broken
        assert 0.2 <= result.inference_s <= wall  # the sum would be >= 0.4 in about 0.2 s
        assert result.inference_s < 0.35

    asyncio.run(main())


def test_two_workers_stop_drains_and_fail_only_their_own_batches(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy]
) -> None:
    policy = shipped_policies["toxicity"]
    poison = tiny_model.encoder._tokenizer.token_to_id("poison")

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        if (ids == poison).any():
            raise RuntimeError("bad batch")
        return tiny_model.run(ids, mask, types)

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=1, workers=2)
        await b.start()
        prompts = [f"p{i}" if i % 4 else "poison" for i in range(12)]
        tasks = [asyncio.create_task(b.submit(tiny_model.encoder.encode(policy, p))) for p in prompts]
        await asyncio.sleep(0)
        await b.stop()  # drains: every queued submission is answered, none is dropped
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for p, r in zip(prompts, results, strict=True):
            if p == "poison":
                assert isinstance(r, RuntimeError)
            else:
                assert not isinstance(r, BaseException) and r.probabilities.shape == (1,)
        assert b.depth == 0 and not b._inflight
        with pytest.raises(BatcherClosed):
            await b.submit(tiny_model.encoder.encode(policy, "late"))

    asyncio.run(main())


def test_stop_timeout_fails_work_stuck_in_every_worker() -> None:
    model = SlowModel()

    async def main() -> None:
        b = MicroBatcher(model.run, max_batch_size=1, workers=2)
        await b.start()
        tasks = [asyncio.create_task(b.submit(fake_job(LONG + i, 1, 16))) for i in range(3)]
        while len(b._inflight) < 2:  # both workers hold a batch, one job still queued
            await asyncio.sleep(0.005)
        await b.stop(timeout=0.2)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, BatcherClosed) for r in results)
        assert b.depth == 0 and not b._inflight
        model.open.set()  # the stuck calls return; their answers go nowhere
        for t in b._threads:
            await asyncio.to_thread(t.join, 10)
        assert not any(t.is_alive() for t in b._threads)

    asyncio.run(main())


def test_runtime_starts_the_configured_workers(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIGUARD_INFERENCE_WORKERS", "2")
    settings = Settings(model_dir=tiny_model_dir, threads=1)
    assert settings.inference_workers == 2

    async def main() -> None:
        runtime = Runtime(settings)
        await runtime.load()
        engine = runtime.engine
        assert engine is not None, runtime.load_error
        assert engine.batcher.workers == 2 and sum(t.is_alive() for t in engine.batcher._threads) == 2
        results = await asyncio.gather(*(engine.classify(engine.resolve("toxicity"), f"hello {i}") for i in range(8)))
        assert all(c.verdicts[0].windows == 1 for c in results)
        await runtime.shutdown()
        assert not any(t.is_alive() for t in engine.batcher._threads)

    asyncio.run(main())


class TwoSessionModel:
    """A fake model with an all-cores ``run`` and a one-thread ``run_shared``: records which
    ran each batch and how many calls overlapped (a wide call must never overlap another)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []  # (session, calls in flight when it started)
        self.open = threading.Event()
        self.open.set()
        self.hold_shared = threading.Event()  # shared calls wait on it (to build up overlap)
        self.hold_shared.set()
        self._lock = threading.Lock()
        self._inflight: list[str] = []
        self.overlapped_wide = False

    def _call(self, kind: str, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            if (kind == "wide" and self._inflight) or "wide" in self._inflight:
                self.overlapped_wide = True
            self._inflight.append(kind)
            self.calls.append((kind, len(self._inflight)))
        (self.hold_shared if kind == "shared" else self.open).wait(10)
        threading.Event().wait(0.01)  # a model call takes time
        with self._lock:
            self._inflight.remove(kind)
        return expected(ids[:, 0], ids[:, 1])

    def run(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        return self._call("wide", ids)

    def run_shared(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        return self._call("shared", ids)


def test_a_lone_batch_runs_on_every_core_and_load_runs_on_the_shared_session() -> None:
    """Adaptive layout: nothing else in flight or waiting -> ``run`` (all intra-op threads);
    under load -> ``run_shared`` on every worker at once; a wide call never overlaps another."""
    model = TwoSessionModel()

    async def main() -> None:
        b = MicroBatcher(model.run, max_batch_size=2, workers=2, run_shared=model.run_shared)
        await b.start()
        for i in range(3):  # one at a time: each the only work
            probs = (await b.submit(b.prepare(fake_job(100 + i, 1, 8)))).probabilities
            np.testing.assert_allclose(probs, expected(100 + i, np.arange(1)))
        assert [k for k, _ in model.calls] == ["wide"] * 3
        model.calls.clear()
        model.hold_shared.clear()
        tasks = [asyncio.create_task(b.submit(b.prepare(fake_job(200 + i, 2, 8)))) for i in range(8)]
        while len(b._inflight) < 2:  # both workers busy at once on the shared session
            await asyncio.sleep(0.005)
        model.hold_shared.set()
        results = await asyncio.gather(*tasks)
        for i, r in enumerate(results):
            np.testing.assert_allclose(r.probabilities, expected(200 + i, np.arange(2)))
        kinds = [k for k, _ in model.calls]
        assert kinds.count("shared") >= 2 and max(n for k, n in model.calls if k == "shared") == 2
        assert not model.overlapped_wide
        await b.stop()

    asyncio.run(main())


def test_runtime_defaults_to_the_adaptive_layout(tiny_model_dir: Path) -> None:
    """threads=2, worker_threads=1 (the defaults on 2 cores): 2 workers, a second session of one
    thread, and the same scores from either session."""
    settings = Settings(model_dir=tiny_model_dir, threads=2)
    assert settings.inference_layout() == (2, 1)
    assert Settings(model_dir=tiny_model_dir, threads=2, worker_threads=2).inference_layout() == (1, None)
    assert Settings(model_dir=tiny_model_dir, threads=1, inference_workers=2).inference_layout() == (2, None)

    async def main() -> None:
        runtime = Runtime(settings)
        await runtime.load()
        engine = runtime.engine
        assert engine is not None, runtime.load_error
        model = engine.model
        assert engine.batcher.workers == 2 and model.shared_session is not None
        enc = model.encoder.encode(engine.resolve("toxicity")[0], "hello there")
        ids, mask, types = (np.stack(x) for x in (enc.input_ids, enc.attention_mask, enc.token_type_ids))
        np.testing.assert_allclose(model.run_shared(ids, mask, types), model.run(ids, mask, types), atol=1e-6)
        results = await asyncio.gather(*(engine.classify(engine.resolve("toxicity"), f"hello {i}") for i in range(8)))
        assert all(c.verdicts[0].windows == 1 for c in results)
        await runtime.shutdown()

    asyncio.run(main())
