"""Micro-batcher: many small requests become few, well-packed model calls (the threads).

A transformer costs far less per window in one call of 16 than in 16 calls, and under load
the queue fills while a batch runs, so batching adds almost no latency. The batcher knows
nothing about HTTP or policies: callers submit windows (token rows) and await one
probability per window.

How a batch is formed:

* **Continuous batching.** Inference threads (``workers``, 1 by default) take the next
  batch the moment their previous one returns, without a trip through the event loop
  (which may be busy parsing requests and writing responses). With several workers each
  takes the next batch in turn and they call the model concurrently (onnxruntime's
  ``InferenceSession.run`` is thread-safe: N workers x T intra-op threads is in effect N
  sessions of T threads). While the model is busy, new windows gather in the queue; when
  a worker is idle, a window is dispatched at once (``max_wait_ms=0``, the default) or
  waits up to ``max_wait_ms`` for batch-mates (useful on a GPU, where a batch of 32
  costs little more than a batch of 1).
* **Adaptive thread layout** (``run_shared``, with several workers). A batch that is the
  only work (nothing else in flight or waiting) runs on ``run``, a session whose intra-op
  threads take every core: the lowest latency for a lone request. Under load the workers
  run concurrently on ``run_shared``, a session of one intra-op thread each: no thread
  waits at onnxruntime's parallel-section barriers for a sibling that the event loop has
  just preempted (on the 2-core box: 86 % of raw onnxruntime's best at 64 clients, against
  65-82 % for one session of 2 threads; docs/performance.md "Thread layout"). While a lone batch runs on
  all cores the other workers wait for it (at most one batch).
* **Which windows.** The fair queue (``service.core.fair_queue``) picks each batch: a new
  request's first windows run in the next batch, a long request keeps at least every other
  batch, mates are bucketed by length within ``max_batch_size`` rows, ``max_batch_tokens``
  padded tokens and ``max_padding``, and forming a batch stays O(batch) under overload.
* **Back-pressure.** The queue holds at most ``max_queue`` windows; ``submit`` raises
  ``QueueFull`` at once beyond that. A caller that gives up (deadline, disconnect) cancels
  its wait and its windows that have not run yet are dropped.
* **Throughput.** ``throughput`` is the padded tokens per second of busy model time over
  the last ``RATE_BATCHES`` batches (overlapping calls of several workers counted once),
  and ``work_ahead`` what the fair schedule runs before a new job finishes: the engine's
  admission budget (``service.core.engine``) is built from the two.

Results go back to the event loop with ``call_soon_threadsafe``; every asyncio future is
touched on the loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.contract.policy import EncodedWindows
from service.core.fair_queue import FairQueue, Job, Window

log = logging.getLogger("uniguard.batching")

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# The throughput estimate covers this many recent batches.
RATE_BATCHES = 64


class QueueFull(Exception):
    """The queue holds max_queue windows already; shed load now rather than queue forever."""


class BatcherClosed(Exception):
    """The batcher is stopped or stopping and takes no new work."""


class BatchObserver(Protocol):
    """Where the batcher reports timings (``service.core.metrics.Metrics`` implements it).

    Called from the inference threads: implementations must be thread-safe (prometheus
    client metrics are).
    """

    def observe_queue_time(self, seconds: float) -> None: ...

    def observe_batch(self, size: int, tokens: int, inference_s: float, padded_tokens: int | None = None) -> None: ...

    def observe_queue_depth(self, depth: int) -> None: ...

    def observe_throughput(self, tokens_per_s: float) -> None: ...


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


class Submission(Job):
    """A queued job and how it is answered: its future, its probabilities as they come, where
    its time went."""

    __slots__ = ("done", "future", "inference_spans", "probs", "queue_s")

    future: asyncio.Future[BatchResult]  # set by submit, on the event loop

    def __init__(self, windows: EncodedWindows, key: int, seq: Iterator[int]) -> None:
        super().__init__(windows, key, seq)
        self.done = 0  # windows with a probability (event loop only)
        self.probs = np.empty(self.n, dtype=np.float32)
        self.queue_s: float | None = None  # set by an inference thread at the first batch
        # (start, end) of each batch it had windows in (event loop only); its inference time is
        # their union: two workers running two of its batches at once is not twice the time.
        self.inference_spans: dict[int, tuple[float, float]] = {}


# What ``MicroBatcher.prepare`` returns: opaque to callers but for ``windows``, ``n`` (the
# window count) and ``pending_tokens`` (their tokens), and only to be submitted.
PreparedWork = Submission


def busy_time(spans: Iterable[tuple[float, float]]) -> float:
    """Seconds covered by the (start, end) spans, time under several overlapping spans
    (batches of several workers at once) counted once."""
    busy = 0.0
    cur: tuple[float, float] | None = None
    for start, end in sorted(spans):
        if cur is not None and start <= cur[1]:
            cur = (cur[0], max(cur[1], end))
            continue
        if cur is not None:
            busy += cur[1] - cur[0]
        cur = (start, end)
    return busy + (cur[1] - cur[0] if cur is not None else 0.0)


def busy_rate(spans: list[tuple[float, float, int]]) -> float | None:
    """Tokens per second of busy time: ``spans`` are (start, end, tokens) of model calls;
    time covered by several overlapping calls (several workers) counts once."""
    if not spans:
        return None
    busy = busy_time((start, end) for start, end, _ in spans)
    tokens = sum(s[2] for s in spans)
    return tokens / busy if busy > 0 else None


class MicroBatcher:
    """Per-request queues of windows drained fairly by inference threads into padded batches."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 8,  # the CPU default of Settings.max_batch_size (docs/performance.md "Thread layout")
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        max_padding: float = 0.2,
        pad_id: int = 0,
        observer: BatchObserver | None = None,
        history: int = 1024,
        workers: int = 1,
        run_shared: RunFn | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if not 0.0 <= max_padding <= 1.0:
            raise ValueError("max_padding must be between 0 and 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._run_fn = run
        # the session workers share under load; only with several workers (else a core idles)
        self._run_shared = run_shared if workers > 1 else None
        self._exclusive: int | None = None  # id of a lone batch running on every core (lock)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else 1 << 62
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_padding = max_padding
        self.pad_id = pad_id
        self.workers = workers
        self._observer = observer
        self.history: deque[BatchRecord] = deque(maxlen=history)  # recent batches, for tests and debugging
        self._cond = threading.Condition(threading.Lock())
        self._queue = FairQueue(max_batch_size, self.max_batch_tokens, max_padding)  # guarded by the lock
        self._job_keys = itertools.count()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._inflight: dict[int, tuple[list[Job], int]] = {}  # batch id -> (its jobs, padded tokens); lock
        self._batch_ids = itertools.count()
        self._rate_lock = threading.Lock()
        self._spans: deque[tuple[float, float, int]] = deque(maxlen=RATE_BATCHES)
        self._rate: float | None = None

    @property
    def depth(self) -> int:
        """Windows waiting for a batch."""
        return self._queue.depth

    @property
    def running(self) -> bool:
        return bool(self._threads) and any(t.is_alive() for t in self._threads) and not self._closing

    @property
    def throughput(self) -> float | None:
        """Padded tokens the model computed per second of busy time over the last
        ``RATE_BATCHES`` batches; None before the first batch."""
        return self._rate

    def work_ahead(self, tokens: int) -> int:
        """Tokens the fair schedule runs before a new job of ``tokens`` tokens is done: each
        queued job's remaining tokens up to ``tokens`` (round-robin shares the model), plus
        the batches in flight."""
        with self._cond:
            return sum(t for _, t in self._inflight.values()) + self._queue.work_ahead(tokens)

    async def start(self) -> None:
        if self._threads:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._worker, name=f"uniguard-batcher-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to ``timeout``), then fail the rest."""
        if not self._threads or self._closing:
            return
        with self._cond:
            self._closing = True  # workers no longer wait out max_wait; they drain and exit
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftover = self._queue.clear()
            leftover += [job for jobs, _ in self._inflight.values() for job in jobs]
            self._inflight.clear()
            for job in leftover:
                job.pending.clear()
                job.pending_tokens = 0
            self._report_depth()
        for job in leftover:
            assert isinstance(job, Submission)
            if not job.future.done():
                job.future.set_exception(BatcherClosed("batcher stopped before this work ran"))

    def prepare(self, windows: EncodedWindows) -> PreparedWork:
        """A submission's per-window records, built from any thread: O(windows), so the
        engine builds a big request's off the event loop. Submit it once, soon after."""
        return Submission(windows, next(self._job_keys), self._seq)

    def discard(self, work: PreparedWork) -> None:
        """Free prepared work that was never submitted (refused, or its deadline passed): its
        windows and the job point to each other, so without this they wait for a full gc.
        No-op once submitted (the batcher forgets a finished job's windows itself)."""
        if not hasattr(work, "future"):
            work.pending.clear()
            work.windows = EncodedWindows([], [], [])

    async def submit(self, windows: EncodedWindows | PreparedWork) -> BatchResult:
        """Queue the windows and wait for their probabilities; QueueFull at once if no room."""
        if not self.running:
            raise BatcherClosed("batcher is not running")
        job = windows if isinstance(windows, Submission) else self.prepare(windows)
        if job.n == 0:
            return BatchResult(np.empty(0, dtype=np.float32), 0.0, 0.0)
        assert self._loop is not None
        assert not hasattr(job, "future"), "prepared work submitted twice"
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        job.future = future
        job.enqueued = time.perf_counter()
        with self._cond:
            depth = self._queue.depth
            if depth + job.n > self.max_queue:
                raise QueueFull(f"queue holds {depth} of {self.max_queue} windows; {job.n} more do not fit")
            self._queue.add(job)
            self._report_depth()
            self._cond.notify()
        future.add_done_callback(lambda _: self._close(job))
        return await future  # cancelling the caller cancels the future; its windows are dropped

    # -- shared ------------------------------------------------------------------------

    def _report_depth(self) -> None:  # lock held
        if self._observer is not None:
            self._observer.observe_queue_depth(self._queue.depth)

    def _close(self, job: Submission) -> None:
        """Forget the windows of a finished job (answered, cancelled or failed) not yet taken."""
        with self._cond:
            if self._queue.remove(job):
                self._report_depth()

    # -- inference threads -------------------------------------------------------------

    def _waiting(self) -> bool:  # lock held
        return self._queue.waiting

    def _wait_for_work(self) -> bool:  # lock held; False: nothing to take (closing, or it went away)
        while not self._waiting() or self._exclusive is not None:
            if self._closing and not self._waiting():
                return False
            self._cond.wait()
        if self.max_wait_s > 0:
            deadline = self._queue.oldest_head() + self.max_wait_s
            while self._queue.depth < self.max_batch_size and not self._closing and self._waiting():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self._waiting()

    def _take(self) -> tuple[int, list[Window]]:  # lock held
        batch = self._queue.take()
        if batch is None:
            return -1, []
        started = time.perf_counter()
        for job in batch.jobs:
            assert isinstance(job, Submission)
            if job.queue_s is None:
                job.queue_s = started - job.enqueued
                if self._observer is not None:
                    self._observer.observe_queue_time(job.queue_s)
        self._report_depth()
        batch_id = next(self._batch_ids)
        self._inflight[batch_id] = (batch.jobs, batch.padded_tokens)
        if self._waiting():
            self._cond.notify()  # more work: an idle worker may take the next batch now
        return batch_id, batch.windows

    def _worker(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work():
                    if self._closing and not self._waiting():
                        return
                    continue
                batch_id, batch = self._take()
                run = self._run_fn
                if batch and self._run_shared is not None:
                    if len(self._inflight) == 1 and not self._waiting():
                        self._exclusive = batch_id  # the only work: all cores, the others wait
                    else:
                        run = self._run_shared
            if batch:
                try:
                    self._run_batch(batch_id, batch, run)
                except Exception:  # a bug here must not silently stop all inference
                    log.exception("batcher worker error")
                    self._deliver_error(batch_id, batch, RuntimeError("internal batching error"))
            # Its windows point to their jobs, and each job to all of its request's token rows:
            # kept while this thread waits, they would pin the last request's memory until the next.
            del batch

    def _run_batch(self, batch_id: int, batch: list[Window], run: RunFn) -> None:
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
            probs = np.asarray(run(ids, mask, types), dtype=np.float32).reshape(-1)
            if probs.shape[0] != size:
                raise RuntimeError(f"model returned {probs.shape[0]} probabilities for {size} windows")
        except Exception as exc:
            log.error("batch of %d windows failed: %s", size, exc)
            self._deliver_error(batch_id, batch, exc)
            return
        ended = time.perf_counter()
        elapsed = ended - started
        record = BatchRecord(size, tokens, elapsed, size * longest)
        self.history.append(record)
        with self._rate_lock:
            self._spans.append((started, ended, size * longest))
            rate = self._rate = busy_rate(list(self._spans))
        if self._observer is not None:
            self._observer.observe_batch(size, tokens, elapsed, size * longest)
            if rate is not None:
                self._observer.observe_throughput(rate)
        self._post(batch_id, self._deliver, batch, probs, (started, ended), batch_id)

    def _post(self, batch_id: int, fn: Callable[..., None], *args: object) -> None:
        with self._cond:
            self._inflight.pop(batch_id, None)
            if self._exclusive == batch_id:
                self._exclusive = None
                self._cond.notify_all()  # workers held back by the lone batch may take work now
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver_error(self, batch_id: int, batch: list[Window], exc: Exception) -> None:
        self._post(batch_id, self._fail, batch, exc)

    # -- event loop --------------------------------------------------------------------

    @staticmethod
    def _deliver(batch: list[Window], probs: np.ndarray, span: tuple[float, float], batch_id: int) -> None:
        for w, p in zip(batch, probs, strict=True):
            job = w.job
            assert isinstance(job, Submission)
            if job.future.done():
                continue
            job.probs[w.index] = p
            job.done += 1
            job.inference_spans[batch_id] = span
            if job.done == job.n:
                inference_s = busy_time(job.inference_spans.values())
                job.future.set_result(BatchResult(job.probs, job.queue_s or 0.0, inference_s))

    @staticmethod
    def _fail(batch: list[Window], exc: Exception) -> None:
        for w in batch:
            job = w.job
            assert isinstance(job, Submission)
            if not job.future.done():
                job.future.set_exception(exc)
