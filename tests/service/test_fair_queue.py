"""The fair queue's policy through its public API: which windows form the next batch, no
threads, no model, no event loop (the batcher around it: test_batching*.py, test_scheduling.py)."""

from __future__ import annotations

import itertools

import numpy as np

from service.contract.policy import EncodedWindows
from service.core.fair_queue import SCAN_FACTOR, FairQueue, Job, Window, select_batch

_seq = itertools.count()
_keys = itertools.count()


def job(*lengths: int) -> Job:
    """A job whose windows have these token lengths, oldest first."""
    rows = [np.ones(n, dtype=np.int64) for n in lengths]
    return Job(EncodedWindows(rows, rows, [np.zeros(n, dtype=np.int64) for n in lengths]), next(_keys), _seq)


def windows(lengths: list[int]) -> list[Window]:
    """One single-window job per length, in arrival order (what select_batch reads)."""
    return [job(n).pending[0] for n in lengths]


def padding(batch: list[Window]) -> float:
    longest = max(w.length for w in batch)
    return 1 - sum(w.length for w in batch) / (longest * len(batch))


def owners(batch_windows: list[Window], jobs: list[Job]) -> list[int]:
    """Which of ``jobs`` each window belongs to (by position)."""
    return [next(i for i, j in enumerate(jobs) if w.job is j) for w in batch_windows]


def test_select_batch_takes_the_oldest_and_its_nearest_lengths() -> None:
    lengths = [60, 128, 20, 62, 127, 21, 59, 126, 22, 61]
    live = windows(lengths)
    batch = select_batch(live, max_size=4, max_tokens=10_000, max_padding=0.2)
    assert live[0] in batch  # the oldest always goes
    assert sorted(w.length for w in batch) == [59, 60, 61, 62]
    assert padding(batch) <= 0.2
    # Oldest is long: its mates are the long ones.
    batch = select_batch(live[1:], max_size=8, max_tokens=10_000, max_padding=0.2)
    assert sorted(w.length for w in batch) == [126, 127, 128]


def test_select_batch_respects_size_tokens_and_padding() -> None:
    live = windows([100] * 10)
    assert len(select_batch(live, max_size=8, max_tokens=10_000, max_padding=0.2)) == 8
    assert len(select_batch(live, max_size=8, max_tokens=350, max_padding=0.2)) == 3
    # A window over the token bound still runs, alone.
    assert len(select_batch(windows([500, 500]), max_size=8, max_tokens=100, max_padding=0.2)) == 1
    # No bucketing (max_padding=1): everything fits in one batch whatever the lengths.
    mixed = windows([10, 128, 10, 128])
    assert len(select_batch(mixed, max_size=8, max_tokens=10_000, max_padding=1.0)) == 4
    assert sorted(w.length for w in select_batch(windows([60, 128, 126, 127, 59]), 8, 10_000, 0.2)) == [59, 60]
    assert sorted(w.length for w in select_batch(mixed, max_size=8, max_tokens=10_000, max_padding=0.2)) == [10, 10]


def test_depth_and_tokens_follow_add_take_and_remove() -> None:
    queue = FairQueue(max_batch_size=2, max_batch_tokens=10_000, max_padding=0.2)
    assert not queue.waiting and queue.take() is None
    a, b = job(10, 10, 10), job(10)
    queue.add(a)
    queue.add(b)
    assert (queue.depth, queue.tokens) == (4, 40)
    batch = queue.take()
    # Round-robin over the jobs: a's first window and b's only one.
    assert batch is not None and batch.jobs == [a, b] and batch.padded_tokens == 20
    assert (queue.depth, queue.tokens) == (2, 20) and len(a.pending) == 2 and not b.pending
    assert not queue.remove(b)  # b has nothing left waiting
    c = job(10)
    queue.add(c)
    assert queue.remove(a)  # a still had two windows waiting
    assert (queue.depth, queue.tokens) == (1, 10) and not a.pending
    assert not queue.remove(a)  # already gone
    assert queue.clear() == [c] and (queue.depth, queue.tokens) == (0, 0) and not queue.waiting


def test_a_new_job_runs_in_the_next_batch_behind_a_long_one() -> None:
    queue = FairQueue(max_batch_size=2, max_batch_tokens=10_000, max_padding=0.2)
    long = job(*[50] * 10)
    queue.add(long)
    first = queue.take()
    assert first is not None and owners(first.windows, [long]) == [0, 0]
    short = job(50)
    queue.add(short)
    second = queue.take()
    assert second is not None
    # The fresh job anchors; the long job's head fills the remaining slot.
    assert second.jobs == [short, long] and owners(second.windows, [short, long]).count(0) == 1


def test_a_served_job_anchors_at_least_every_other_batch_under_a_stream_of_new_ones() -> None:
    # Lengths far apart: a batch holds one job's windows only (no mates within max_padding).
    queue = FairQueue(max_batch_size=4, max_batch_tokens=10_000, max_padding=0.1)
    long = job(*[200] * 40)
    queue.add(long)
    assert queue.take() is not None  # long is now a served job
    anchors = []
    for _ in range(8):
        queue.add(job(10))  # a new short request before every batch
        batch = queue.take()
        assert batch is not None
        anchors.append("long" if batch.jobs[0] is long else "new")
    assert anchors == ["new", "long"] * 4


def test_work_ahead_counts_each_job_up_to_the_new_jobs_size() -> None:
    queue = FairQueue(max_batch_size=8, max_batch_tokens=10_000, max_padding=0.2)
    queue.add(job(100, 100, 100))  # 300 tokens
    queue.add(job(20))
    # A new job of 50 tokens shares the model round-robin: at most 50 of the long job go first.
    assert queue.work_ahead(50) == 50 + 20
    # No queued job is longer than a new one of 1,000 tokens: everything queued goes first.
    assert queue.work_ahead(1_000) == 320


def test_candidates_are_round_robin_and_bounded() -> None:
    queue = FairQueue(max_batch_size=1, max_batch_tokens=10_000, max_padding=0.2)
    jobs = [job(*[10] * 20) for _ in range(3)]
    for j in jobs:
        queue.add(j)
    live = queue.candidates(fresh_first=True)
    assert len(live) == SCAN_FACTOR  # SCAN_FACTOR x max_batch_size
    assert owners(live, jobs) == [0, 1, 2, 0, 1, 2, 0, 1]
