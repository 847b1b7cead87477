"""Asyncio micro-batcher: many small requests become few model calls.

A transformer on CPU costs far less per window in a batch of 16 than in 16 calls, and
under load the queue fills while a batch runs, so batching adds almost no latency. The
batcher knows nothing about HTTP or policies: callers submit windows (token rows) and
await one probability per window. Work runs in a single-thread executor so the event
loop keeps accepting requests while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.policy import EncodedWindows, pad_batch

log = logging.getLogger("uniguard.batching")

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class QueueFull(Exception):
    """The queue holds max_queue windows already; shed load now rather than queue forever."""


class BatcherClosed(Exception):
    """The batcher is stopped or stopping and takes no new work."""


class BatchObserver(Protocol):
    """Where the batcher reports timings (``service.metrics.Metrics`` implements it)."""

    def observe_queue_time(self, seconds: float) -> None: ...

    def observe_batch(self, size: int, tokens: int, inference_s: float) -> None: ...

    def observe_queue_depth(self, depth: int) -> None: ...


@dataclass(frozen=True)
class BatchResult:
    """Probabilities of one submission, in window order, with where its time went."""

    probabilities: np.ndarray
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class BatchRecord:
    size: int
    tokens: int
    inference_s: float


class _Job:
    """One submission; its windows may be spread over several batches."""

    __slots__ = ("windows", "future", "enqueued", "n", "next", "done", "probs", "queue_s", "inference_s")

    def __init__(self, windows: EncodedWindows, future: asyncio.Future[BatchResult]) -> None:
        self.windows = windows
        self.future = future
        self.enqueued = time.perf_counter()
        self.n = windows.count
        self.next = 0  # first window not yet put in a batch
        self.done = 0  # windows with a probability
        self.probs = np.empty(self.n, dtype=np.float32)
        self.queue_s: float | None = None
        self.inference_s = 0.0


class MicroBatcher:
    """Bounded queue of windows drained by one worker task into padded batches."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        pad_id: int = 0,
        observer: BatchObserver | None = None,
        history: int = 1024,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self._run_fn = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.pad_id = pad_id
        self._observer = observer
        self.history: deque[BatchRecord] = deque(maxlen=history)  # recent batches, for tests and debugging
        self._jobs: deque[_Job] = deque()
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._inflight: list[_Job] = []

    @property
    def depth(self) -> int:
        """Windows waiting for a batch."""
        return self._depth

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniguard-infer")
        self._task = asyncio.create_task(self._worker(), name="uniguard-batcher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to ``timeout``), then fail the rest."""
        if self._task is None or self._closing:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._inflight, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(BatcherClosed("batcher stopped before this work ran"))
        self._jobs.clear()
        self._inflight = []
        self._set_depth(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def submit(self, windows: EncodedWindows) -> BatchResult:
        """Queue the windows and wait for their probabilities; QueueFull at once if no room."""
        if not self.running:
            raise BatcherClosed("batcher is not running")
        if windows.count == 0:
            return BatchResult(np.empty(0, dtype=np.float32), 0.0, 0.0)
        if self._depth + windows.count > self.max_queue:
            raise QueueFull(f"queue holds {self._depth} of {self.max_queue} windows; {windows.count} more do not fit")
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        job = _Job(windows, future)
        future.add_done_callback(lambda _: self._drop(job))
        self._jobs.append(job)
        self._set_depth(self._depth + job.n)
        self._wakeup.set()
        return await future  # cancelling the caller cancels the future; the worker skips it

    # -- worker side -------------------------------------------------------------------

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._observer is not None:
            self._observer.observe_queue_depth(depth)

    def _drop(self, job: _Job) -> None:
        """Forget the unscheduled windows of a finished job (cancelled or failed)."""
        if job.next < job.n:
            self._set_depth(self._depth - (job.n - job.next))
            job.next = job.n

    def _prune(self) -> None:
        while self._jobs and (self._jobs[0].future.done() or self._jobs[0].next >= self._jobs[0].n):
            self._drop(self._jobs.popleft())

    async def _worker(self) -> None:
        while True:
            try:
                self._prune()
                if not self._jobs:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._gather_more(self._jobs[0].enqueued + self.max_wait_s)
                slots = self._take()
                if slots:
                    await self._run_batch(slots)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not silently stop all inference
                log.exception("batcher worker error")

    async def _gather_more(self, deadline: float) -> None:
        """Wait for batch-mates until the batch is full or the oldest window's wait is over."""
        while self._depth < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[tuple[_Job, int, int]]:
        slots: list[tuple[_Job, int, int]] = []
        count = 0
        while self._jobs and count < self.max_batch_size:
            job = self._jobs[0]
            if job.future.done() or job.next >= job.n:
                self._drop(self._jobs.popleft())
                continue
            k = min(job.n - job.next, self.max_batch_size - count)
            slots.append((job, job.next, job.next + k))
            job.next += k
            count += k
            if job.next >= job.n:
                self._jobs.popleft()
        self._set_depth(self._depth - count)
        return slots

    async def _run_batch(self, slots: list[tuple[_Job, int, int]]) -> None:
        ids, mask, types = [], [], []
        for job, a, b in slots:
            ids += job.windows.input_ids[a:b]
            mask += job.windows.attention_mask[a:b]
            types += job.windows.token_type_ids[a:b]
        size, tokens = len(ids), int(sum(len(r) for r in ids))
        started = time.perf_counter()
        for job, _, _ in slots:
            if job.queue_s is None:
                job.queue_s = started - job.enqueued
                if self._observer is not None:
                    self._observer.observe_queue_time(job.queue_s)
        loop = asyncio.get_running_loop()
        self._inflight = [job for job, _, _ in slots]
        try:
            probs = await loop.run_in_executor(
                self._executor, self._run_fn, pad_batch(ids, self.pad_id), pad_batch(mask, 0), pad_batch(types, 0)
            )
            probs = np.asarray(probs, dtype=np.float32).reshape(-1)
            if probs.shape[0] != size:
                raise RuntimeError(f"model returned {probs.shape[0]} probabilities for {size} windows")
        except Exception as exc:
            self._inflight = []
            log.error("batch of %d windows failed: %s", size, exc)
            for job, _, _ in slots:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        # (on cancellation during stop() the in-flight jobs stay listed so stop() fails them)
        self._inflight = []
        elapsed = time.perf_counter() - started
        self.history.append(BatchRecord(size, tokens, elapsed))
        if self._observer is not None:
            self._observer.observe_batch(size, tokens, elapsed)
        offset = 0
        for job, a, b in slots:
            job.probs[a:b] = probs[offset : offset + (b - a)]
            offset += b - a
            job.done += b - a
            job.inference_s += elapsed
            if job.done == job.n and not job.future.done():
                job.future.set_result(BatchResult(job.probs, job.queue_s or 0.0, job.inference_s))
