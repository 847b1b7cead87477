"""Soak test: is memory flat and is p99 flat over a long, steady, moderate load?

    python -m bench.soak --minutes 10                  # the documented run: models/default, 50% of capacity
    python -m bench.soak --minutes 2 --interval 10     # a short check
    python -m bench.soak --model-dir /tmp/tiny --minutes 0.5 --rate 20

1. Starts the service (``python -m service``, a child process) and waits for /readyz.
2. Capacity: ``--capacity-clients`` closed-loop clients for ``--capacity-seconds``; the
   completed requests per second are the measured capacity (skipped with ``--rate``).
3. Soak: an open-loop schedule at ``--fraction`` of capacity (requests leave on time
   whether or not earlier ones were answered; latency counts from the scheduled time, so a
   stall is not hidden) for ``--minutes``. Every ``--interval`` seconds one row: the
   service's RSS (psutil), p50/p99 of that interval, requests, errors, queue depth.
4. Prints the table and a verdict: RSS at start and end, its growth from the end of the
   first third of the run (warm-up) to the end (flat: under 5 %), and p99 of the last
   interval vs the first (flat: under 1.5x); ``--json`` writes everything.

Bounded: capacity phase + minutes + a few seconds of start-up, nothing else. The workload
is the benchmark's (single-policy classify bodies from ../shared/data, fixed order).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.httpclient import Connection, HttpError, encode_post
from bench.serving import ServiceProcess, drive, metric_value
from bench.workload import build_requests

MIB = 1 << 20
# Reuse a connection only if it was idle less than this (uvicorn closes idle ones after 5 s).
KEEPALIVE_S = 3.0


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    requests: int
    errors: int
    late: int  # not sent: max_inflight requests were already waiting (the service fell behind)
    rate_rps: float
    p50_ms: float | None
    p99_ms: float | None
    queue_depth: float


def rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    total: int = proc.memory_info().rss  # psutil ships no types
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # the child exited meanwhile
            total += child.memory_info().rss
    return total / MIB


async def measure_capacity(service: ServiceProcess, bodies: list[bytes], clients: int, seconds: float) -> float:
    samples, _, errors, elapsed, _, _ = await drive(
        service.port, bodies, clients, seconds, warmup=3.0, snapshot=service.metrics
    )
    if not samples:
        raise RuntimeError(f"capacity run answered nothing ({errors} errors)")
    return len(samples) / elapsed


async def soak(
    service: ServiceProcess, bodies: list[bytes], rate: float, seconds: float, interval: float, max_inflight: int
) -> list[Sample]:
    idle: list[tuple[Connection, float]] = []  # (connection, last used)
    inflight = 0
    lat: list[float] = []
    errors = late = sent = 0
    tasks: set[asyncio.Task[None]] = set()
    rows: list[Sample] = []

    async def one(body: bytes, scheduled: float) -> None:
        nonlocal inflight, errors
        conn = None
        while idle and conn is None:
            conn, used = idle.pop()
            if time.perf_counter() - used > KEEPALIVE_S:  # the server may have closed it: not our error
                await conn.close()
                conn = None
        conn = conn or Connection("127.0.0.1", service.port)
        try:
            status, _, _ = await conn.request(body)
            if status == 200:
                lat.append(time.perf_counter() - scheduled)
            else:
                errors += 1
            idle.append((conn, time.perf_counter()))
        except (OSError, HttpError, asyncio.IncompleteReadError):
            errors += 1
            await conn.close()
        finally:
            inflight -= 1

    async def sample(t: float, window_s: float) -> None:
        nonlocal lat, errors, late, sent
        window, lat = lat, []
        ms = np.asarray(window) * 1e3
        depth = metric_value(await service.metrics(), "uniguard_queue_depth")
        rows.append(
            Sample(
                round(t, 1),
                round(rss_mib(service.proc.pid), 1),
                len(window),
                errors,
                late,
                round(len(window) / window_s, 1),
                round(float(np.percentile(ms, 50)), 2) if ms.size else None,
                round(float(np.percentile(ms, 99)), 2) if ms.size else None,
                depth,
            )
        )
        errors = late = sent = 0
        r = rows[-1]
        print(
            f"  t={r.t_s:7.1f}s  rss={r.rss_mib:8.1f} MiB  rps={r.rate_rps:7.1f}  p50={r.p50_ms} ms  "
            f"p99={r.p99_ms} ms  errors={r.errors} late={r.late}",
            file=sys.stderr,
            flush=True,
        )

    start = time.perf_counter()
    next_sample = start + interval
    i = 0
    while True:
        now = time.perf_counter()
        if now >= next_sample:
            await sample(next_sample - start, interval)
            next_sample += interval
        if now - start >= seconds:
            break
        scheduled = start + i / rate
        if scheduled > now:
            await asyncio.sleep(min(scheduled - now, max(0.0, next_sample - now)))
            continue
        i += 1
        if inflight >= max_inflight:
            late += 1
            continue
        inflight += 1
        sent += 1
        task = asyncio.create_task(one(bodies[i % len(bodies)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    for conn, _ in idle:
        await conn.close()
    return rows


def verdict(rows: list[Sample]) -> dict[str, object]:
    """Flatness is judged after the first third of the run (allocator arenas and onnxruntime's
    per-shape buffers grow while new prompt lengths first appear); start/end are reported too."""
    first, last = rows[0], rows[-1]
    settled = rows[len(rows) // 3]
    p99s = [r.p99_ms for r in rows if r.p99_ms is not None]
    rss_growth = (last.rss_mib - settled.rss_mib) / settled.rss_mib
    p99_ratio = (last.p99_ms or 0) / first.p99_ms if first.p99_ms else None
    return {
        "rss_start_mib": first.rss_mib,
        "rss_settled_mib": settled.rss_mib,
        "rss_end_mib": last.rss_mib,
        "rss_max_mib": max(r.rss_mib for r in rows),
        "rss_growth_after_warmup": round(rss_growth, 4),
        "p99_start_ms": first.p99_ms,
        "p99_end_ms": last.p99_ms,
        "p99_median_ms": float(np.median(p99s)) if p99s else None,
        "p99_end_over_start": round(p99_ratio, 3) if p99_ratio else None,
        "requests": sum(r.requests for r in rows),
        "errors": sum(r.errors for r in rows),
        "late": sum(r.late for r in rows),
        "memory_flat": abs(rss_growth) < 0.05,
        "p99_flat": p99_ratio is not None and p99_ratio < 1.5,
    }


def print_table(rows: list[Sample]) -> None:
    print(
        f"{'t (s)':>8} {'RSS MiB':>9} {'req':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'late':>5} "
        f"{'queue':>6}"
    )
    for r in rows:
        print(
            f"{r.t_s:8.1f} {r.rss_mib:9.1f} {r.requests:6d} {r.rate_rps:7.1f} "
            f"{r.p50_ms if r.p50_ms is not None else '-':>8} "
            f"{r.p99_ms if r.p99_ms is not None else '-':>8} {r.errors:6d} {r.late:5d} {r.queue_depth:6.0f}"
        )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # The request list repeats: with the verdict cache on most of the soak would be cache hits,
    # not model work (pass --env UNIGUARD_VERDICT_CACHE_ENTRIES=200000 to soak the cache itself).
    env = {"UNIGUARD_VERDICT_CACHE_ENTRIES": "0", **dict(kv.split("=", 1) for kv in args.env)}
    threads = args.threads or os.cpu_count() or 1
    service = ServiceProcess(args.model_dir, threads, env, args.log_dir / "soak-service.log")
    try:
        await service.wait_ready()
        bodies = [
            encode_post("127.0.0.1", "/v1/classify", b)
            for b in build_requests(args.requests, max_chars=args.max_chars or None)
        ]
        if args.rate:
            capacity, rate = None, args.rate
        else:
            print(
                f"capacity: {args.capacity_clients} closed-loop clients for {args.capacity_seconds:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            capacity = await measure_capacity(service, bodies, args.capacity_clients, args.capacity_seconds)
            rate = capacity * args.fraction
        print(
            f"soak: {rate:.1f} req/s"
            + (f" ({args.fraction:.0%} of the measured {capacity:.1f} req/s)" if capacity else "")
            + f" for {args.minutes:g} min, a row every {args.interval:g} s",
            file=sys.stderr,
            flush=True,
        )
        rows = await soak(service, bodies, rate, args.minutes * 60, args.interval, args.max_inflight)
    finally:
        service.stop()
    summary = verdict(rows)
    print_table(rows)
    print(
        json.dumps(
            {"capacity_rps": round(capacity, 1) if capacity else None, "rate_rps": round(rate, 1), **summary}, indent=2
        )
    )
    result = {
        "capacity_rps": capacity,
        "rate_rps": rate,
        "minutes": args.minutes,
        "threads": threads,
        "model_dir": str(args.model_dir),
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("UNIGUARD_MODEL_DIR", "models/default")))
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds per table row (RSS sample, p50/p99 window)")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of the measured capacity to offer")
    ap.add_argument("--rate", type=float, default=None, help="requests/s to offer (skips the capacity phase)")
    ap.add_argument("--capacity-clients", type=int, default=8)
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument(
        "--max-inflight", type=int, default=64, help="requests waiting at once before new ones count as late"
    )
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads of the service (default: CPU count)")
    ap.add_argument("--requests", type=int, default=2000, help="distinct requests in the mix")
    ap.add_argument("--max-chars", type=int, default=2000, help="leave out longer prompts (0: keep all)")
    ap.add_argument(
        "--env", action="append", default=[], metavar="UNIGUARD_X=V", help="extra service setting (repeatable)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write capacity, rows and verdict here")
    ap.add_argument("--log-dir", type=Path, default=Path("runs/soak"))
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or not 0 < args.fraction <= 1:
        ap.error("--minutes and --interval must be positive, --fraction in (0, 1]")
    result = asyncio.run(main_async(args))
    return 1 if result["summary"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
