"""Raw onnxruntime (the limit) against the service over HTTP, on the same machine and model.

1. Pre-tokenise a fixed request mix (``bench.workload``) with the model's own encoder.
2. **raw**: run the model on those windows in batches of B (sorted by length, so padding is
   the least any batcher could reach) in this process, for each batch size needed; and
   request by request (each request's windows as one batch, as the service does when
   alone) for the latency a caller cannot avoid.
3. **service**: start ``python -m service`` as a child (same process group), and drive it
   with 1, 8 and 64 concurrent keep-alive clients over loopback for a fixed time each. The
   mean batch size the service actually ran comes from its ``/metrics``; the raw limit at
   that batch size (measured, not interpolated) is the 100 % for its row.

The load generator runs in this process and costs CPU the service could have used: it is
a minimal pre-encoded HTTP/1.1 client (see ``bench.httpclient``) so that share is small.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np

from bench.httpclient import Connection, encode_get, encode_post
from bench.workload import build_requests
from service.inference import OnnxModel
from service.policy import DEFAULT_POLICIES_DIR, EncodedWindows, load_policies

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    mode: str  # "raw" | "service"
    clients: int | None
    batch: float  # windows per model call (mean)
    rps: float  # requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    pct_of_raw: float | None = None
    added_p50_ms: float | None = None
    errors: int = 0
    requests: int = 0
    padding: float | None = None  # padded share of computed tokens
    windows_per_s: float = 0.0  # model work done: what "% of raw" compares
    cpu_ms_per_window: float | None = None  # CPU spent per window (all threads): robust to a busy machine
    pct_of_raw_cpu: float | None = None  # raw CPU per window / service CPU per window
    outside_model_p50_ms: float | None = None  # service: latency minus its own model time (x-inference-time)
    note: str = ""


@dataclass
class Report:
    machine: Machine
    settings: dict[str, object]
    rows: list[Row] = field(default_factory=list)

    def markdown(self) -> str:
        head = (
            "| mode | clients | windows/batch | throughput (req/s) | p50 ms | p95 ms | p99 ms | % of raw at same batch "
            "| added p50 ms | outside model p50 ms | CPU ms/window | % of raw, CPU |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for r in self.rows:
            lines.append(
                f"| {'raw onnxruntime' if r.mode == 'raw' else 'service (HTTP)'}{' ' + r.note if r.note else ''} "
                f"| {r.clients if r.clients is not None else '–'} | {r.batch:.1f} | {r.rps:.1f} "
                f"| {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} "
                f"| {f'{r.pct_of_raw:.0f} %' if r.pct_of_raw is not None else '–'} "
                f"| {f'{r.added_p50_ms:+.2f}' if r.added_p50_ms is not None else '–'} "
                f"| {f'{r.outside_model_p50_ms:.2f}' if r.outside_model_p50_ms is not None else '–'} "
                f"| {f'{r.cpu_ms_per_window:.1f}' if r.cpu_ms_per_window is not None else '–'} "
                f"| {f'{r.pct_of_raw_cpu:.0f} %' if r.pct_of_raw_cpu is not None else '–'} |"
            )
        return head + "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(
            {"machine": self.machine, "settings": self.settings, "rows": [asdict(r) for r in self.rows]}, indent=2
        )


class Machine(TypedDict, total=False):
    """Where a benchmark ran (``machine_info``; provider and the load after are added by the run)."""

    cpu: str
    cores: int | None
    threads: int
    python: str
    onnxruntime: str
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    other_busy_processes: list[str]
    provider: str


def machine_info(threads: int) -> Machine:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    busy = []
    try:
        out = subprocess.run(
            ["pgrep", "-af", "training.cli|pytest|locust"], capture_output=True, text=True, timeout=5
        ).stdout
        busy = [line for line in out.splitlines() if str(os.getpid()) not in line.split()[:1]]
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_before": os.getloadavg(),
        "other_busy_processes": busy,
    }


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(samples_s: list[float]) -> tuple[float, float, float]:
    if not samples_s:
        return (float("nan"),) * 3
    p = np.percentile(np.asarray(samples_s) * 1e3, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


# -- raw onnxruntime -----------------------------------------------------------------------


def _pad(rows: list[np.ndarray], value: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Raw:
    """The model alone on pre-tokenised windows: the limit.

    onnxruntime runs with its thread spinning on and off (the service turns it off to leave
    the CPU to its event loop); each measurement keeps the faster of the two, so the limit
    is the best onnxruntime does on this machine, not the service's configuration.
    """

    def __init__(self, models: list[OnnxModel], encoded: list[EncodedWindows]) -> None:
        self.models = models
        self.encoded = encoded
        rows = [
            (ids, m, t)
            for e in encoded
            for ids, m, t in zip(e.input_ids, e.attention_mask, e.token_type_ids, strict=True)
        ]
        self.rows = sorted(rows, key=lambda r: len(r[0]))
        self.windows_per_request = len(rows) / len(encoded)
        self._cache: dict[int, Row] = {}

    def _feeds(
        self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, mask, types = zip(*rows, strict=True)
        return _pad(list(ids), self.models[0].pad_id), _pad(list(mask), 0), _pad(list(types), 0)

    def at_batch(self, batch: int, seconds: float) -> Row:
        """Throughput over length-sorted batches of ``batch`` windows, visited in a shuffled order."""
        if batch in self._cache:
            return self._cache[batch]
        chunks = [self.rows[i : i + batch] for i in range(0, len(self.rows), batch)]
        chunks = [c for c in chunks if len(c) == batch] or chunks
        rng = np.random.default_rng(0)
        order = rng.permutation(len(chunks))
        feeds = [self._feeds(chunks[i]) for i in order]
        best: Row | None = None
        for model in self.models:
            model.run(*feeds[0])  # warm this shape
            times: list[float] = []
            padded = real = 0
            done_windows = 0
            started = time.perf_counter()
            cpu0 = time.process_time()
            i = 0
            while time.perf_counter() - started < seconds / len(self.models) or len(times) < 3:
                f = feeds[i % len(feeds)]
                t0 = time.perf_counter()
                model.run(*f)
                times.append(time.perf_counter() - t0)
                done_windows += f[0].shape[0]
                padded += f[0].size
                real += int(f[1].sum())
                i += 1
            elapsed = sum(times)
            p50, p95, p99 = percentiles(times)
            cpu_ms = (time.process_time() - cpu0) * 1e3 / done_windows
            row = Row(
                "raw",
                None,
                done_windows / len(times),
                done_windows / elapsed / self.windows_per_request,
                p50,
                p95,
                p99,
                requests=int(done_windows / self.windows_per_request),
                padding=1 - real / padded,
                windows_per_s=done_windows / elapsed,
                cpu_ms_per_window=cpu_ms,
            )
            if best is None:
                best = row
            else:  # the faster configuration; and the thriftier one's CPU, each the best onnxruntime reaches
                cheapest = min(best.cpu_ms_per_window or cpu_ms, cpu_ms)
                best = row if row.windows_per_s > best.windows_per_s else best
                best.cpu_ms_per_window = cheapest
        assert best is not None
        self._cache[batch] = best
        return best

    def per_request(self, indices: list[int]) -> tuple[Row, dict[int, float]]:
        """The given requests one at a time, each request's windows as one call: the model
        time a lone caller cannot avoid (the faster configuration, request by request).
        Returns the row and each index's time."""
        feeds = {}
        for i in dict.fromkeys(indices):
            e = self.encoded[i % len(self.encoded)]
            feeds[i] = self._feeds(list(zip(e.input_ids, e.attention_mask, e.token_type_ids, strict=True)))
        times: dict[int, float] = {}
        windows = {i: f[0].shape[0] for i, f in feeds.items()}
        cpu_ms = float("inf")
        for model in self.models:
            model.run(*next(iter(feeds.values())))
            cpu0 = time.process_time()
            for i, f in feeds.items():
                t0 = time.perf_counter()
                model.run(*f)
                times[i] = min(times.get(i, float("inf")), time.perf_counter() - t0)
            cpu_ms = min(cpu_ms, (time.process_time() - cpu0) * 1e3 / sum(windows.values()))
        values = list(times.values())
        p50, p95, p99 = percentiles(values)
        row = Row(
            "raw",
            1,
            sum(windows.values()) / len(values),
            len(values) / sum(values),
            p50,
            p95,
            p99,
            requests=len(values),
            note="request by request",
            windows_per_s=sum(windows.values()) / sum(values),
            cpu_ms_per_window=cpu_ms,
        )
        return row, times


# -- the service over HTTP -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, model_dir: Path, threads: int, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("UNIGUARD_")}
        full.update(
            {
                "UNIGUARD_HOST": "127.0.0.1",
                "UNIGUARD_PORT": str(self.port),
                "UNIGUARD_MODEL_DIR": str(model_dir),
                "UNIGUARD_THREADS": str(threads),
                **env,
            }
        )
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:  # a child: same process group, ended with the bench
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=REPO, env=full, stdout=fh, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                conn = Connection("127.0.0.1", self.port)
                status, _, _ = await conn.request(encode_get("127.0.0.1", "/readyz"))
                await conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"service not ready after {timeout} s:\n{self.log.read_text()[-2000:]}")

    async def metrics(self) -> str:
        conn = Connection("127.0.0.1", self.port)
        _, _, body = await conn.request(encode_get("127.0.0.1", "/metrics"))
        await conn.close()
        return body.decode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def drive(
    port: int, bodies: list[bytes], clients: int, seconds: float, warmup: float, snapshot: Callable[[], Awaitable[str]]
) -> tuple[list[tuple[int, float]], list[float], int, float, str, str]:
    """``clients`` connections, each sending the next request as soon as its answer is in.

    Warm-up lasts ``warmup`` seconds and at least until every client has had two answers
    (steady state: with a slow model, 64 clients queue for seconds). Returns the measured
    (request index, latency) pairs, each one's latency outside the service's model call, the
    error count, the measured time and ``snapshot()`` (/metrics) at its start and end."""
    counter = 0
    samples: list[tuple[int, float]] = []
    outside: list[float] = []  # latency minus the service's own model time (x-inference-time)
    errors = 0
    answered = 0
    measuring = False
    stop_at = float("inf")

    async def client() -> None:
        nonlocal counter, errors, answered
        conn = Connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                index = counter
                counter += 1
                t0 = time.perf_counter()
                status, headers, _ = await conn.request(bodies[index % len(bodies)])
                done = time.perf_counter()
                answered += 1
                if measuring and done <= stop_at:
                    if status == 200:
                        samples.append((index, done - t0))
                        outside.append(done - t0 - float(headers.get(b"x-inference-time", b"0")) / 1e3)
                    else:
                        errors += 1
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    started = time.perf_counter()
    while time.perf_counter() - started < warmup or answered < 2 * clients:
        await asyncio.sleep(0.05)
        if all(t.done() for t in tasks):
            break
    first = await snapshot()
    measuring = True
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
    last = await snapshot()
    elapsed = time.perf_counter() - t_start
    await asyncio.gather(*tasks)
    return samples, outside, errors, elapsed, first, last


async def bench_service(
    service: ServiceProcess, bodies: list[bytes], clients: int, seconds: float, warmup: float
) -> tuple[Row, list[tuple[int, float]]]:
    cpu: list[float] = []

    async def snapshot() -> str:
        cpu.append(process_cpu_s(service.proc.pid))
        return await service.metrics()

    samples, outside, errors, elapsed, before, after = await drive(
        service.port, bodies, clients, seconds, warmup, snapshot
    )
    latencies = [lat for _, lat in samples]

    def delta(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    batches = delta("uniguard_batch_size_count")
    windows = delta("uniguard_batch_size_sum")
    padded = delta("uniguard_batch_padded_tokens_sum")
    real = delta("uniguard_batch_tokens_sum")
    p50, p95, p99 = percentiles(latencies)
    row = Row(
        "service",
        clients,
        windows / batches if batches else 0.0,
        len(latencies) / elapsed,
        p50,
        p95,
        p99,
        errors=errors,
        requests=len(latencies),
        padding=1 - real / padded if padded else None,
        windows_per_s=windows / elapsed,
        cpu_ms_per_window=(cpu[1] - cpu[0]) * 1e3 / windows if windows else None,
        outside_model_p50_ms=float(np.median(outside)) * 1e3 if outside else None,
    )
    return row, samples


def run(
    model_dir: Path,
    *,
    concurrency: tuple[int, ...] = (1, 8, 64),
    seconds: float = 10.0,
    warmup: float = 2.0,
    raw_seconds: float = 5.0,
    threads: int | None = None,
    n_requests: int = 2000,
    max_chars: int | None = None,
    service_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    progress: bool = True,
    provider: str = "auto",
) -> Report:
    threads = threads or os.cpu_count() or 1

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    report = Report(
        machine_info(threads),
        {
            "model_dir": str(model_dir),
            "concurrency": list(concurrency),
            "seconds": seconds,
            "requests": n_requests,
            "max_chars": max_chars,
            "service_env": service_env or {},
        },
    )
    requests = build_requests(n_requests, max_chars=max_chars)
    policies = load_policies(DEFAULT_POLICIES_DIR)
    bodies = [encode_post("127.0.0.1", "/v1/classify", r) for r in requests]

    # Interleaved, so a machine whose load drifts treats both alike: each client count runs
    # against a fresh service, then (service stopped, never sharing the CPU) raw onnxruntime
    # on the same work: the same requests one by one at one client, else the batch size the
    # service ran. Reference batch sizes 1, 8, 32 come last.
    log_root = log_dir or REPO / "runs" / "bench"
    env = {
        "UNIGUARD_REQUEST_TIMEOUT_S": "300",
        "UNIGUARD_PROVIDER": provider,
        **(service_env or {}),
    }  # throughput, not shedding
    models = [OnnxModel.load(model_dir, threads, provider=provider, spinning=spin) for spin in (True, False)]
    report.machine["provider"] = f"{models[0].provider} ({models[0].precision})"
    encoded = [models[0].encoder.encode(policies[r["policy_id"]], r["prompt"]) for r in requests]
    raw = Raw(models, encoded)
    raw_rows: dict[int, Row] = {}
    service_rows: list[Row] = []
    single: Row | None = None
    for c in concurrency:
        service = ServiceProcess(Path(model_dir), threads, env, log_root / f"service-{c}.log")
        try:
            asyncio.run(service.wait_ready())
            say(f"service: {c} client(s), {seconds:.0f} s measured ...")
            row, samples = asyncio.run(bench_service(service, bodies, c, seconds, warmup))
        finally:
            service.stop()
        if c == 1:
            say(f"raw onnxruntime: the {len(samples)} requests of the 1-client run, one by one ...")
            single, single_times = raw.per_request([i for i, _ in samples])
            # Paired: the same requests, service latency minus model time, median over requests.
            row.added_p50_ms = float(np.median([lat - single_times[i] for i, lat in samples])) * 1e3
            row.pct_of_raw = 100.0 * row.rps / single.rps if single.rps else None
            limit = single
        else:
            b = max(1, round(row.batch))
            say(f"raw onnxruntime: batches of {b} ...")
            limit = raw_rows[b] = raw.at_batch(b, raw_seconds)
            # Model work per second against the model alone at the batch size the service ran:
            # windows/s, so the share does not depend on which requests fell in the window.
            row.pct_of_raw = 100.0 * row.windows_per_s / limit.windows_per_s if limit.windows_per_s else None
        if row.cpu_ms_per_window and limit.cpu_ms_per_window:
            row.pct_of_raw_cpu = 100.0 * limit.cpu_ms_per_window / row.cpu_ms_per_window
        service_rows.append(row)
    for b in (1, 8, 32):
        if b not in raw_rows:
            say(f"raw onnxruntime: batches of {b} ...")
            raw_rows[b] = raw.at_batch(b, raw_seconds)
    if single is not None:
        report.rows.append(single)
    report.rows.extend(raw_rows[b] for b in sorted(raw_rows))
    report.rows.extend(service_rows)
    report.machine["load_average_after"] = os.getloadavg()
    return report
