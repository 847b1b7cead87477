"""Micro-batcher: many small requests become few, well-packed model calls.

A transformer costs far less per window in one call of 16 than in 16 calls, and under load
the queue fills while a batch runs, so batching adds almost no latency. The batcher knows
nothing about HTTP or policies: callers submit windows (token rows) and await one
probability per window.

How a batch is formed:

* **Continuous batching.** One inference thread takes the next batch the moment the
  previous one returns, without a trip through the event loop (which may be busy parsing
  requests and writing responses). While the model is busy, new windows gather in the
  queue; when it is idle, a window is dispatched at once (``max_wait_ms=0``, the default)
  or waits up to ``max_wait_ms`` for batch-mates (useful on a GPU, where a batch of 32
  costs little more than a batch of 1).
* **Bounds.** At most ``max_batch_size`` windows and ``max_batch_tokens`` padded tokens
  (rows x longest row) per call; one window longer than the token bound still runs alone.
* **Length bucketing.** The oldest waiting window always goes into the next batch (so no
  window starves); its batch-mates are the waiting windows closest to it in length, none
  padded by more than ``max_padding`` of the longest row. On CPU a padded token costs as
  much as a real one, so short and long windows run in separate calls; on a GPU, where
  width is nearly free, a higher ``max_padding`` packs fuller batches.
* **Back-pressure.** The queue holds at most ``max_queue`` windows; ``submit`` raises
  ``QueueFull`` at once beyond that. A caller that gives up (deadline, disconnect) cancels
  its wait and its windows that have not run yet are dropped.

Results go back to the event loop with ``call_soon_threadsafe``; every asyncio future is
touched on the loop only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.policy import EncodedWindows

log = logging.getLogger("uniguard.batching")

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# Bucketing looks at the oldest windows only (this many per batch slot): it bounds the
# work of forming a batch under overload and how far a window can be overtaken.
SCAN_FACTOR = 8


class QueueFull(Exception):
    """The queue holds max_queue windows already; shed load now rather than queue forever."""


class BatcherClosed(Exception):
    """The batcher is stopped or stopping and takes no new work."""


class BatchObserver(Protocol):
    """Where the batcher reports timings (``service.metrics.Metrics`` implements it).

    Called from the inference thread: implementations must be thread-safe (prometheus
    client metrics are).
    """

    def observe_queue_time(self, seconds: float) -> None: ...

    def observe_batch(self, size: int, tokens: int, inference_s: float, padded_tokens: int | None = None) -> None: ...

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
    tokens: int  # real tokens
    inference_s: float
    padded_tokens: int = 0  # size x longest row

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


class _Job:
    """One submission; its windows may be spread over several batches."""

    __slots__ = ("windows", "future", "enqueued", "n", "unscheduled", "closed", "done", "probs", "queue_s", "inference_s", "batches")

    def __init__(self, windows: EncodedWindows, future: asyncio.Future[BatchResult]) -> None:
        self.windows = windows
        self.future = future
        self.enqueued = time.perf_counter()
        self.n = windows.count
        self.unscheduled = self.n  # windows not yet taken into a batch (guarded by the lock)
        self.closed = False  # caller gone or failed: skip its windows (guarded by the lock)
        self.done = 0  # windows with a probability (event loop only)
        self.probs = np.empty(self.n, dtype=np.float32)
        self.queue_s: float | None = None  # set by the inference thread at the first batch
        self.inference_s = 0.0  # event loop only
        self.batches: set[int] = set()  # batch ids already counted in inference_s (event loop only)


class _Window:
    __slots__ = ("job", "index", "length", "seq")

    def __init__(self, job: _Job, index: int, length: int, seq: int) -> None:
        self.job, self.index, self.length, self.seq = job, index, length, seq


def select_batch(live: list[_Window], max_size: int, max_tokens: int, max_padding: float) -> list[_Window]:
    """The windows of the next batch; ``live`` is in arrival order and not empty.

    The oldest window anchors the batch. Its mates are taken among the windows sorted by
    length, growing the range around the anchor by whichever neighbour adds the least
    padding, while the batch stays within ``max_size`` rows and ``max_tokens`` padded
    tokens and no row is padded by more than ``max_padding`` of the longest row (a length
    bucket around the anchor).
    """
    anchor = live[0]
    order = sorted(live, key=lambda w: (w.length, w.seq))
    lo = hi = next(i for i, w in enumerate(order) if w is anchor)
    longest = anchor.length
    count = 1
    while count < max_size:
        best: tuple[int, int, int] | None = None  # (added padded tokens, seq, side)
        if lo > 0:
            w = order[lo - 1]
            if (count + 1) * longest <= max_tokens and w.length >= (1.0 - max_padding) * longest:
                best = (longest - w.length, w.seq, -1)
        if hi + 1 < len(order):
            w = order[hi + 1]
            if (count + 1) * w.length <= max_tokens and order[lo].length >= (1.0 - max_padding) * w.length:
                cand = ((w.length - longest) * count, w.seq, 1)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            break
        if best[2] < 0:
            lo -= 1
        else:
            hi += 1
            longest = order[hi].length
        count += 1
    return order[lo : hi + 1]


class MicroBatcher:
    """Bounded queue of windows drained by one inference thread into padded batches."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        max_padding: float = 0.2,
        pad_id: int = 0,
        observer: BatchObserver | None = None,
        history: int = 1024,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if not 0.0 <= max_padding <= 1.0:
            raise ValueError("max_padding must be between 0 and 1")
        self._run_fn = run
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else 1 << 62
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_padding = max_padding
        self.pad_id = pad_id
        self._observer = observer
        self.history: deque[BatchRecord] = deque(maxlen=history)  # recent batches, for tests and debugging
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Window] = deque()  # arrival order; windows of closed jobs are skipped
        self._depth = 0  # live windows waiting (guarded by the lock)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._inflight: list[_Job] = []
        self._batch_ids = itertools.count()

    @property
    def depth(self) -> int:
        """Windows waiting for a batch."""
        return self._depth

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._worker, name="uniguard-batcher", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to ``timeout``), then fail the rest."""
        if self._thread is None or self._closing:
            return
        with self._cond:
            self._closing = True  # the worker no longer waits out max_wait; it drains and exits
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join, timeout)
        with self._cond:
            leftover = [w.job for w in self._queue] + list(self._inflight)
            self._queue.clear()
            self._inflight = []
            for job in leftover:
                job.closed = True
                job.unscheduled = 0
            self._set_depth(0)
        for job in leftover:
            if not job.future.done():
                job.future.set_exception(BatcherClosed("batcher stopped before this work ran"))

    async def submit(self, windows: EncodedWindows) -> BatchResult:
        """Queue the windows and wait for their probabilities; QueueFull at once if no room."""
        if not self.running:
            raise BatcherClosed("batcher is not running")
        if windows.count == 0:
            return BatchResult(np.empty(0, dtype=np.float32), 0.0, 0.0)
        assert self._loop is not None
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        job = _Job(windows, future)
        with self._cond:
            if self._depth + job.n > self.max_queue:
                raise QueueFull(f"queue holds {self._depth} of {self.max_queue} windows; {job.n} more do not fit")
            for i, ids in enumerate(windows.input_ids):
                self._queue.append(_Window(job, i, len(ids), next(self._seq)))
            self._set_depth(self._depth + job.n)
            self._cond.notify()
        future.add_done_callback(lambda _: self._close(job))
        return await future  # cancelling the caller cancels the future; its windows are dropped

    # -- shared ------------------------------------------------------------------------

    def _set_depth(self, depth: int) -> None:  # lock held
        self._depth = depth
        if self._observer is not None:
            self._observer.observe_queue_depth(depth)

    def _close(self, job: _Job) -> None:
        """Forget the windows of a finished job (answered, cancelled or failed) not yet taken."""
        with self._cond:
            job.closed = True
            if job.unscheduled:
                self._set_depth(self._depth - job.unscheduled)
                job.unscheduled = 0

    # -- inference thread --------------------------------------------------------------

    def _prune(self) -> None:  # lock held
        while self._queue and self._queue[0].job.closed:
            self._queue.popleft()

    def _wait_for_work(self) -> bool:  # lock held; False: closing and nothing left
        while True:
            self._prune()
            if self._queue:
                break
            if self._closing:
                return False
            self._cond.wait()
        if self.max_wait_s > 0:
            deadline = self._queue[0].job.enqueued + self.max_wait_s
            while self._depth < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._prune()
        return True

    def _take(self) -> list[_Window]:  # lock held
        limit = SCAN_FACTOR * self.max_batch_size
        live: list[_Window] = []
        for w in self._queue:
            if not w.job.closed:
                live.append(w)
                if len(live) >= limit:
                    break
        if not live:
            return []
        longest = max(w.length for w in live)
        if (
            len(live) <= self.max_batch_size
            and len(live) * longest <= self.max_batch_tokens
            and min(w.length for w in live) >= (1.0 - self.max_padding) * longest
        ):
            chosen = live  # all of it fits: the common case below saturation
        else:
            chosen = select_batch(live, self.max_batch_size, self.max_batch_tokens, self.max_padding)
        taken = {id(w) for w in chosen}
        self._queue = deque(w for w in self._queue if id(w) not in taken and not w.job.closed)
        started = time.perf_counter()
        for w in chosen:
            job = w.job
            job.unscheduled -= 1
            if job.queue_s is None:
                job.queue_s = started - job.enqueued
                if self._observer is not None:
                    self._observer.observe_queue_time(job.queue_s)
        self._set_depth(self._depth - len(chosen))
        self._inflight = list({id(w.job): w.job for w in chosen}.values())
        return chosen

    def _worker(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work():
                    return
                batch = self._take()
            if batch:
                try:
                    self._run_batch(batch)
                except Exception:  # a bug here must not silently stop all inference
                    log.exception("batcher worker error")
                    self._deliver_error(batch, RuntimeError("internal batching error"))

    def _run_batch(self, batch: list[_Window]) -> None:
        size = len(batch)
        longest = max(w.length for w in batch)
        ids = np.full((size, longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((size, longest), dtype=np.int64)
        types = np.zeros((size, longest), dtype=np.int64)
        tokens = 0
        for row, w in enumerate(batch):
            enc, i, n = w.job.windows, w.index, w.length
            ids[row, :n] = enc.input_ids[i]
            mask[row, :n] = enc.attention_mask[i]
            types[row, :n] = enc.token_type_ids[i]
            tokens += n
        started = time.perf_counter()
        try:
            probs = np.asarray(self._run_fn(ids, mask, types), dtype=np.float32).reshape(-1)
            if probs.shape[0] != size:
                raise RuntimeError(f"model returned {probs.shape[0]} probabilities for {size} windows")
        except Exception as exc:
            log.error("batch of %d windows failed: %s", size, exc)
            self._deliver_error(batch, exc)
            return
        elapsed = time.perf_counter() - started
        record = BatchRecord(size, tokens, elapsed, size * longest)
        self.history.append(record)
        if self._observer is not None:
            self._observer.observe_batch(size, tokens, elapsed, size * longest)
        self._post(self._deliver, batch, probs, elapsed, next(self._batch_ids))

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        with self._cond:
            self._inflight = []
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _deliver_error(self, batch: list[_Window], exc: Exception) -> None:
        self._post(self._fail, batch, exc)

    # -- event loop --------------------------------------------------------------------

    @staticmethod
    def _deliver(batch: list[_Window], probs: np.ndarray, elapsed: float, batch_id: int) -> None:
        for w, p in zip(batch, probs, strict=True):
            job = w.job
            if job.future.done():
                continue
            job.probs[w.index] = p
            job.done += 1
            if batch_id not in job.batches:
                job.batches.add(batch_id)
                job.inference_s += elapsed
            if job.done == job.n:
                job.future.set_result(BatchResult(job.probs, job.queue_s or 0.0, job.inference_s))

    @staticmethod
    def _fail(batch: list[_Window], exc: Exception) -> None:
        for w in batch:
            if not w.job.future.done():
                w.job.future.set_exception(exc)
