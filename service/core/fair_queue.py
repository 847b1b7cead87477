"""Fair queue: which waiting windows make up the next model call.

The scheduling policy of the micro-batcher (``service.core.batcher``), kept apart from its
threads, locks and futures so it can be read and tested on its own. It is not thread-safe:
the batcher calls it under its lock.

* **Fair scheduling across requests.** Queued work is kept per submission (a ``Job``: its
  windows, oldest first), and a batch is anchored by a *job*'s oldest waiting window, not
  by the oldest window overall. With one flat queue the oldest window anchors every
  batch, so a 100,000-character prompt (~400 windows) runs to its end before anything
  queued behind it: a "hi" behind it waits out its 10 s deadline. Jobs wait in two
  orders: *fresh* (never served, in arrival order) and *served* (least recently served
  first; a job that gets windows into a batch moves to the back). A fresh job anchors the
  next batch, so a new short request waits for the batch in flight and runs in the next
  one, whatever else is queued; but when the last batch was anchored by a fresh job and
  left out the head of the served jobs, that head anchors this one, so a long job gets at
  least every other batch under a stream of new requests and no job starves.
* **Bounds.** At most ``max_batch_size`` windows and ``max_batch_tokens`` padded tokens
  (rows x longest row) per call; one window longer than the token bound still runs alone.
* **Length bucketing.** The anchor's batch-mates are the candidate windows closest to it
  in length, none padded by more than ``max_padding`` of the longest row (``select_batch``).
  Candidates are taken round-robin over the jobs in scheduling order (the first waiting
  window of each job, then the second of each, ...), so equally good mates are shared
  between jobs. On CPU a padded token costs as much as a real one, so short and long
  windows run in separate calls; on a GPU, where width is nearly free, a higher
  ``max_padding`` packs fuller batches.
* **Bounded work.** Forming a batch looks at ``SCAN_FACTOR x max_batch_size`` candidate
  windows at most (and as many jobs), however long the queue: it stays O(batch) under
  overload. Jobs live in two ordered dicts (move-to-back and removal in O(1)), their
  windows in a deque each.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from service.contract.policy import EncodedWindows

# Batch forming looks at this many candidate windows per batch slot at most: it bounds the
# work of forming a batch under overload and how far length bucketing reaches.
SCAN_FACTOR = 8


class Job:
    """One submission; its windows may be spread over several batches.

    ``windows`` are its token rows, ``n`` their count, ``key`` its place in the queue's job
    order, ``pending`` the windows not yet taken (oldest first) and ``pending_tokens`` their
    tokens. Subclasses add what the caller needs to answer it (the batcher: a future).
    """

    __slots__ = ("enqueued", "key", "n", "pending", "pending_tokens", "windows")

    def __init__(self, windows: EncodedWindows, key: int, seq: Iterator[int]) -> None:
        self.windows = windows
        self.enqueued = time.perf_counter()
        self.n = windows.count
        self.key = key
        self.pending: deque[Window] = deque(
            Window(self, i, len(ids), next(seq)) for i, ids in enumerate(windows.input_ids)
        )
        self.pending_tokens = windows.tokens


class Window:
    """One token row of a job: ``index`` in its job, ``length`` in tokens, ``seq`` its arrival order."""

    __slots__ = ("index", "job", "length", "seq")

    def __init__(self, job: Job, index: int, length: int, seq: int) -> None:
        self.job, self.index, self.length, self.seq = job, index, length, seq


@dataclass(frozen=True)
class Batch:
    """What ``FairQueue.take`` hands out: the windows of one model call, and the jobs that
    have windows in it, in scheduling order."""

    windows: list[Window]
    jobs: list[Job]

    @property
    def padded_tokens(self) -> int:
        """Rows x longest row: what the model computes."""
        return len(self.windows) * max(w.length for w in self.windows)


def select_batch(live: list[Window], max_size: int, max_tokens: int, max_padding: float) -> list[Window]:
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


class FairQueue:
    """Jobs waiting for the model, drained fairly into length-bucketed batches."""

    def __init__(self, max_batch_size: int, max_batch_tokens: int, max_padding: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        # Jobs with windows waiting: never served yet, in arrival order; served already,
        # least recently served first.
        self._fresh: OrderedDict[int, Job] = OrderedDict()
        self._served: OrderedDict[int, Job] = OrderedDict()
        self._passed_over = False  # the last batch was anchored by a fresh job and left out the served head
        self.depth = 0  # windows waiting
        self.tokens = 0  # their tokens

    @property
    def waiting(self) -> bool:
        """Whether any job has windows waiting."""
        return bool(self._fresh or self._served)

    def jobs(self) -> Iterator[Job]:
        """The waiting jobs: fresh ones first, then served ones."""
        return itertools.chain(self._fresh.values(), self._served.values())

    def oldest_head(self) -> float:
        """When the job at the head of either order was queued (the queue is not empty)."""
        return min(next(iter(d.values())).enqueued for d in (self._fresh, self._served) if d)

    def add(self, job: Job) -> None:
        """Queue a new job behind the fresh ones."""
        self._fresh[job.key] = job
        self.tokens += job.pending_tokens
        self.depth += job.n

    def remove(self, job: Job) -> bool:
        """Drop a job's windows not yet taken (answered, cancelled or failed); whether it was
        still queued."""
        if self._fresh.pop(job.key, None) is not None or self._served.pop(job.key, None) is not None or job.pending:
            self.tokens -= job.pending_tokens
            self.depth -= len(job.pending)
            job.pending.clear()
            job.pending_tokens = 0
            return True
        return False

    def clear(self) -> list[Job]:
        """Empty the queue; the jobs that were waiting, their windows dropped."""
        jobs = list(self.jobs())
        self._fresh.clear()
        self._served.clear()
        for job in jobs:
            job.pending.clear()
            job.pending_tokens = 0
        self.depth = self.tokens = 0
        return jobs

    def work_ahead(self, tokens: int) -> int:
        """Queued tokens the fair schedule runs before a new job of ``tokens`` tokens is done:
        each queued job's remaining tokens up to ``tokens`` (round-robin shares the model)."""
        if self.tokens <= tokens:  # no queued job is longer than this one
            return self.tokens
        return sum(min(job.pending_tokens, tokens) for job in self.jobs())

    def candidates(self, fresh_first: bool) -> list[Window]:
        """Waiting windows in scheduling order: round-robin over the first jobs (the first
        window of each, then the second of each, ...), at most SCAN_FACTOR x max_batch_size."""
        limit = SCAN_FACTOR * self.max_batch_size
        first, second = (self._fresh, self._served) if fresh_first else (self._served, self._fresh)
        jobs = itertools.islice(itertools.chain(first.values(), second.values()), limit)
        iters = [iter(job.pending) for job in jobs]
        live: list[Window] = []
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

    def take(self) -> Batch | None:
        """Take the next batch's windows out of the queue; None when nothing waits.

        Fresh jobs anchor first (a new short request waits for one batch at most), but a
        served job anchors at least every other batch (a long one keeps going). Jobs with
        windows in the batch move to the back of the served order (or leave the queue when
        none are left)."""
        fresh_first = bool(self._fresh) and not (self._passed_over and self._served)
        served_head = next(iter(self._served)) if self._served else None
        live = self.candidates(fresh_first)
        if not live:
            return None
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
        served: dict[int, Job] = {}  # jobs with windows in this batch, in scheduling order
        for w in live:
            job = w.job
            scanned[job.key] = scanned.get(job.key, 0) + 1
            if id(w) in taken:
                served.setdefault(job.key, job)
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
        self.tokens -= tokens
        self.depth -= len(chosen)
        self._passed_over = fresh_first and served_head is not None and served_head not in served
        return Batch(chosen, list(served.values()))
