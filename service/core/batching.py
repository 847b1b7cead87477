"""Micro-batcher: many small requests become few, well-packed model calls.

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
  65-82 % for one session of 2 threads; README "Thread layout"). While a lone batch runs on
  all cores the other workers wait for it (at most one batch).
* **Fair scheduling across requests.** Queued work is kept per submission (a job: its
  windows, oldest first), and a batch is anchored by a *job*'s oldest waiting window, not
  by the oldest window overall. Before this, one flat queue let the oldest window anchor
  every batch, so a 100,000-character prompt (~400 windows) ran to its end before
  anything queued behind it: a "hi" behind it waited out its 10 s deadline. Jobs wait in
  two orders: *fresh* (never served, in arrival order) and *served* (least recently
  served first; a job that gets windows into a batch moves to the back). A fresh job
  anchors the next batch, so a new short request waits for the batch in flight and runs
  in the next one, whatever else is queued; but when the last batch was anchored by a
  fresh job and left out the head of the served jobs, that head anchors this one, so a
  long job gets at least every other batch under a stream of new requests and no job
  starves.
* **Bounds.** At most ``max_batch_size`` windows and ``max_batch_tokens`` padded tokens
  (rows x longest row) per call; one window longer than the token bound still runs alone.
* **Length bucketing.** The anchor's batch-mates are the candidate windows closest to it
  in length, none padded by more than ``max_padding`` of the longest row. Candidates are
  taken round-robin over the jobs in scheduling order (the first waiting window of each
  job, then the second of each, ...), so equally good mates are shared between jobs. On
  CPU a padded token costs as much as a real one, so short and long windows run in
  separate calls; on a GPU, where width is nearly free, a higher ``max_padding`` packs
  fuller batches.
* **Bounded work.** Forming a batch looks at ``SCAN_FACTOR x max_batch_size`` candidate
  windows at most (and as many jobs), however long the queue: it stays O(batch) under
  overload. Jobs live in two ordered dicts (move-to-back and removal in O(1)), their
  windows in a deque each.
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
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.contract.policy import EncodedWindows

log = logging.getLogger("uniguard.batching")

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# Batch forming looks at this many candidate windows per batch slot at most: it bounds the
# work of forming a batch under overload and how far length bucketing reaches.
SCAN_FACTOR = 8
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


class _Job:
    """One submission; its windows may be spread over several batches."""

    __slots__ = (
        "batches",
        "closed",
        "done",
        "enqueued",
        "future",
        "inference_spans",
        "key",
        "n",
        "pending",
        "pending_tokens",
        "probs",
        "queue_s",
        "windows",
    )

    future: asyncio.Future[BatchResult]  # set by submit, on the event loop

    def __init__(self, windows: EncodedWindows, key: int, seq: Iterator[int]) -> None:
        self.windows = windows
        self.enqueued = time.perf_counter()
        self.n = windows.count
        self.key = key  # its entry in the batcher's job order
        # Windows not yet taken, oldest first (guarded by the lock once submitted) and their tokens.
        self.pending: deque[_Window] = deque(
            _Window(self, i, len(ids), next(seq)) for i, ids in enumerate(windows.input_ids)
        )
        self.pending_tokens = windows.tokens
        self.closed = False  # caller gone or failed: skip its windows (guarded by the lock)
        self.done = 0  # windows with a probability (event loop only)
        self.probs = np.empty(self.n, dtype=np.float32)
        self.queue_s: float | None = None  # set by an inference thread at the first batch
        # (start, end) of each batch it had windows in (event loop only); its inference time is
        # their union: two workers running two of its batches at once is not twice the time.
        self.inference_spans: dict[int, tuple[float, float]] = {}


# What ``MicroBatcher.prepare`` returns: opaque to callers but for ``windows``, ``n`` (the
# window count) and ``pending_tokens`` (their tokens), and only to be submitted.
PreparedWork = _Job


class _Window:
    __slots__ = ("index", "job", "length", "seq")

    def __init__(self, job: _Job, index: int, length: int, seq: int) -> None:
        self.job, self.index, self.length, self.seq = job, index, length, seq


def select_batch(live: list[_Window], max_size: int, max_tokens: int, max_padding: float) -> list[_Window]:
    """The windows of the next batch; ``live`` is in scheduling order and not empty.

    The first window anchors the batch. Its mates are taken among the windows sorted by
    length, growing the range around the anchor by whichever neighbour adds the least
    padding (on a tie, the one earlier in ``live``), while the batch stays within
    ``max_size`` rows and ``max_tokens`` padded tokens and no row is padded by more than
    ``max_padding`` of the longest row (a length bucket around the anchor).
    """
    order = sorted(range(len(live)), key=lambda i: (live[i].length, i))
    lo = hi = order.index(0)
    longest = live[0].length
    count = 1
    while count < max_size:
        best: tuple[int, int, int] | None = None  # (added padded tokens, rank, side)
        if lo > 0:
            w = live[order[lo - 1]]
            if (count + 1) * longest <= max_tokens and w.length >= (1.0 - max_padding) * longest:
                best = (longest - w.length, order[lo - 1], -1)
        if hi + 1 < len(order):
            w = live[order[hi + 1]]
            if (count + 1) * w.length <= max_tokens and live[order[lo]].length >= (1.0 - max_padding) * w.length:
                cand = ((w.length - longest) * count, order[hi + 1], 1)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            break
        if best[2] < 0:
            lo -= 1
        else:
            hi += 1
            longest = live[order[hi]].length
        count += 1
    return [live[i] for i in order[lo : hi + 1]]


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
        max_batch_size: int = 8,  # the CPU default of Settings.max_batch_size (README "Thread layout")
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
        # Jobs with windows waiting (guarded by the lock): never served yet, in arrival order;
        # served already, least recently served first.
        self._fresh: OrderedDict[int, _Job] = OrderedDict()
        self._served: OrderedDict[int, _Job] = OrderedDict()
        self._passed_over = False  # the last batch was anchored by a fresh job and left out the served head
        self._depth = 0  # live windows waiting (guarded by the lock)
        self._queued_tokens = 0  # their tokens (guarded by the lock)
        self._job_keys = itertools.count()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._inflight: dict[int, tuple[list[_Job], int]] = {}  # batch id -> (its jobs, padded tokens); lock
        self._batch_ids = itertools.count()
        self._rate_lock = threading.Lock()
        self._spans: deque[tuple[float, float, int]] = deque(maxlen=RATE_BATCHES)
        self._rate: float | None = None

    @property
    def depth(self) -> int:
        """Windows waiting for a batch."""
        return self._depth

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
            ahead = sum(t for _, t in self._inflight.values())
            if self._queued_tokens <= tokens:  # no queued job is longer than this one
                return ahead + self._queued_tokens
            jobs = itertools.chain(self._fresh.values(), self._served.values())
            return ahead + sum(min(job.pending_tokens, tokens) for job in jobs)

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
            leftover = [*self._fresh.values(), *self._served.values()]
            leftover += [job for jobs, _ in self._inflight.values() for job in jobs]
            self._fresh.clear()
            self._served.clear()
            self._inflight.clear()
            for job in leftover:
                job.closed = True
                job.pending.clear()
                job.pending_tokens = 0
            self._queued_tokens = 0
            self._set_depth(0)
        for job in leftover:
            if not job.future.done():
                job.future.set_exception(BatcherClosed("batcher stopped before this work ran"))

    def prepare(self, windows: EncodedWindows) -> PreparedWork:
        """A submission's per-window records, built from any thread: O(windows), so the
        engine builds a big request's off the event loop. Submit it once, soon after."""
        return _Job(windows, next(self._job_keys), self._seq)

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
        job = windows if isinstance(windows, _Job) else self.prepare(windows)
        if job.n == 0:
            return BatchResult(np.empty(0, dtype=np.float32), 0.0, 0.0)
        assert self._loop is not None
        assert not hasattr(job, "future"), "prepared work submitted twice"
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        job.future = future
        job.enqueued = time.perf_counter()
        with self._cond:
            if self._depth + job.n > self.max_queue:
                raise QueueFull(f"queue holds {self._depth} of {self.max_queue} windows; {job.n} more do not fit")
            self._fresh[job.key] = job
            self._queued_tokens += job.pending_tokens
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
            if self._fresh.pop(job.key, None) is not None or self._served.pop(job.key, None) is not None or job.pending:
                self._queued_tokens -= job.pending_tokens
                self._set_depth(self._depth - len(job.pending))
                job.pending.clear()
                job.pending_tokens = 0

    # -- inference threads -------------------------------------------------------------

    def _waiting(self) -> bool:  # lock held
        return bool(self._fresh or self._served)

    def _wait_for_work(self) -> bool:  # lock held; False: nothing to take (closing, or it went away)
        while not self._waiting() or self._exclusive is not None:
            if self._closing and not self._waiting():
                return False
            self._cond.wait()
        if self.max_wait_s > 0:
            heads = [next(iter(d.values())) for d in (self._fresh, self._served) if d]
            deadline = min(job.enqueued for job in heads) + self.max_wait_s
            while self._depth < self.max_batch_size and not self._closing and self._waiting():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self._waiting()

    def _candidates(self, fresh_first: bool) -> list[_Window]:  # lock held
        """Waiting windows in scheduling order: round-robin over the first jobs (the first
        window of each, then the second of each, ...), at most SCAN_FACTOR x max_batch_size."""
        limit = SCAN_FACTOR * self.max_batch_size
        first, second = (self._fresh, self._served) if fresh_first else (self._served, self._fresh)
        jobs = itertools.islice(itertools.chain(first.values(), second.values()), limit)
        iters = [iter(job.pending) for job in jobs]
        live: list[_Window] = []
        while iters and len(live) < limit:
            still = []
            for it in iters:
                w = next(it, None)
                if w is not None:
                    live.append(w)
                    still.append(it)
                    if len(live) >= limit:
                        break
            iters = still
        return live

    def _take(self) -> tuple[int, list[_Window]]:  # lock held
        # Fresh jobs anchor first (a new short request waits for one batch at most), but a
        # served job anchors at least every other batch (a long one keeps going).
        fresh_first = bool(self._fresh) and not (self._passed_over and self._served)
        served_head = next(iter(self._served)) if self._served else None
        live = self._candidates(fresh_first)
        if not live:
            return -1, []
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
        scanned: dict[int, int] = {}  # job key -> its windows among the candidates (a prefix of its deque)
        served: dict[int, _Job] = {}  # jobs with windows in this batch, in scheduling order
        for w in live:
            job = w.job
            scanned[job.key] = scanned.get(job.key, 0) + 1
            if id(w) in taken:
                served.setdefault(job.key, job)
        started = time.perf_counter()
        tokens = 0
        for job in served.values():
            head = [job.pending.popleft() for _ in range(scanned[job.key])]
            kept = [w for w in head if id(w) not in taken]
            job.pending.extendleft(reversed(kept))  # oldest first still
            for w in head:
                if id(w) in taken:
                    job.pending_tokens -= w.length
                    tokens += w.length
            self._fresh.pop(job.key, None)
            self._served.pop(job.key, None)
            if job.pending:
                self._served[job.key] = job  # served: behind every job waiting for its turn
            if job.queue_s is None:
                job.queue_s = started - job.enqueued
                if self._observer is not None:
                    self._observer.observe_queue_time(job.queue_s)
        self._queued_tokens -= tokens
        self._set_depth(self._depth - len(chosen))
        batch_id = next(self._batch_ids)
        self._inflight[batch_id] = (list(served.values()), len(chosen) * max(w.length for w in chosen))
        self._passed_over = fresh_first and served_head is not None and served_head not in served
        if self._waiting():
            self._cond.notify()  # more work: an idle worker may take the next batch now
        return batch_id, chosen

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

    def _run_batch(self, batch_id: int, batch: list[_Window], run: RunFn) -> None:
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

    def _deliver_error(self, batch_id: int, batch: list[_Window], exc: Exception) -> None:
        self._post(batch_id, self._fail, batch, exc)

    # -- event loop --------------------------------------------------------------------

    @staticmethod
    def _deliver(batch: list[_Window], probs: np.ndarray, span: tuple[float, float], batch_id: int) -> None:
        for w, p in zip(batch, probs, strict=True):
            job = w.job
            if job.future.done():
                continue
            job.probs[w.index] = p
            job.done += 1
            job.inference_spans[batch_id] = span
            if job.done == job.n:
                inference_s = busy_time(job.inference_spans.values())
                job.future.set_result(BatchResult(job.probs, job.queue_s or 0.0, inference_s))

    @staticmethod
    def _fail(batch: list[_Window], exc: Exception) -> None:
        for w in batch:
            if not w.job.future.done():
                w.job.future.set_exception(exc)
