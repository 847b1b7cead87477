"""Raw onnxruntime (the limit) against the service over HTTP, on the same machine and model.

For each request mix (``bench.workload.MIXES``: short prompts, and the long mix):

1. Pre-tokenise a fixed request mix with the model's own encoder.
2. **service**: start ``python -m service`` as a child (same process group), and drive it
   with 1, 8 and 64 concurrent keep-alive clients over loopback for a fixed time each. The
   mean batch size the service actually ran comes from its ``/metrics``.
3. **raw**, with the service stopped: the model in this process on the same windows, in
   length-sorted batches (the least padding any batcher could reach) for every batch size of
   the sweep (1, 2, 4, ... 64) and the service's own batch sizes, each with onnxruntime's
   intra-op spinning on and off; and request by request (each request's windows as one call,
   as the service does when alone) for the latency a caller cannot avoid, paired with the
   1-client run.
4. **The limit** is the best raw configuration of the mix (``best_config``: the most windows/s,
   whatever the batch size and spinning); every row's "% of limit" is against it, windows/s and
   CPU per window. Raw at the service's own batch size stays as a secondary column.

The load generator runs in this process and costs CPU the service could have used: it is
a minimal pre-encoded HTTP/1.1 client (see ``bench.httpclient``) so that share is small.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np

from bench.httpclient import Connection, encode_get, encode_post
from bench.workload import MIXES, build_requests
from service.contract.policy import DEFAULT_POLICIES_DIR, EncodedWindows, load_policies
from service.model.onnx_model import OnnxModel

REPO = Path(__file__).resolve().parents[1]
RAW_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# Load and warm-up of a service on a busy machine (another process training) can take minutes.
READY_TIMEOUT_S = 600.0


@dataclass
class Row:
    mode: str  # "raw" | "service"
    clients: int | None  # None: a raw batch configuration; raw request by request: 1
    batch: float  # windows per model call (mean)
    rps: float  # requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mix: str = ""
    spinning: bool | None = None  # raw batches: onnxruntime intra-op spinning; None: service, or per request the faster
    pct_of_limit: float | None = None  # windows/s against the mix's limit (its best raw configuration)
    pct_of_limit_cpu: float | None = None  # the limit's CPU per window / this row's
    pct_of_raw_same_batch: float | None = (
        None  # service: against raw at its own batch size (1 client: request by request)
    )
    added_p50_ms: float | None = None  # 1-client service: median over the same requests of latency minus raw time
    raw_p50_ms: float | None = None  # 1-client service: raw p50 of the same requests, one by one
    errors: int = 0
    requests: int = 0
    padding: float | None = None  # padded share of computed tokens
    windows_per_s: float = 0.0  # model work done: what the percentages compare
    cpu_ms_per_window: float | None = None  # CPU spent per window (all threads): robust to a busy machine
    outside_model_p50_ms: float | None = None  # service: latency minus its own model time (x-inference-time)
    limit: bool = False  # this raw row is its mix's limit
    note: str = ""


def best_config(rows: Iterable[Row]) -> Row:
    """The limit among measured rows: the raw batch configuration (any batch size, spinning on
    or off) with the most windows/s; on a tie the one spending less CPU per window. Request-by-
    request and service rows are not candidates."""
    candidates = [r for r in rows if r.mode == "raw" and r.clients is None and r.windows_per_s > 0]
    if not candidates:
        raise ValueError("no raw batch configuration measured")
    return max(candidates, key=lambda r: (r.windows_per_s, -(r.cpu_ms_per_window or math.inf)))


def _spin(value: bool | None) -> str:
    return "–" if value is None else ("on" if value else "off")


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


@dataclass
class Report:
    machine: Machine
    settings: dict[str, object]
    rows: list[Row] = field(default_factory=list)
    limits: dict[str, Row] = field(default_factory=dict)  # mix -> its best raw configuration

    def markdown(self) -> str:
        head = (
            "| mix | mode | clients | windows/batch | spinning | throughput (req/s) | windows/s | p50 ms | p95 ms "
            "| p99 ms | % of limit | % of limit, CPU | % of raw at same batch | added p50 ms "
            "| raw p50 ms, same requests | outside model p50 ms | CPU ms/window |\n"
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for r in self.rows:
            mode = "raw onnxruntime" if r.mode == "raw" else "service (HTTP)"
            if r.note:
                mode += " " + r.note
            if r.limit:
                mode = f"**{mode} = limit**"
            lines.append(
                f"| {r.mix or '–'} | {mode} | {r.clients if r.clients is not None else '–'} | {r.batch:.1f} "
                f"| {_spin(r.spinning)} | {r.rps:.1f} | {r.windows_per_s:.1f} "
                f"| {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} "
                f"| {_num(r.pct_of_limit, '.0f', ' %')} | {_num(r.pct_of_limit_cpu, '.0f', ' %')} "
                f"| {_num(r.pct_of_raw_same_batch, '.0f', ' %')} | {_num(r.added_p50_ms, '+.2f')} "
                f"| {_num(r.raw_p50_ms, '.2f')} | {_num(r.outside_model_p50_ms, '.2f')} "
                f"| {_num(r.cpu_ms_per_window, '.1f')} |"
            )
        summary = "".join(f"- {line}\n" for line in self.summary())
        return head + "\n".join(lines) + "\n" + ("\n" + summary if summary else "")

    def summary(self) -> list[str]:
        """One line a mix: its limit (which raw configuration) and the 1-client figures."""
        out = []
        for mix, limit in self.limits.items():
            line = (
                f"limit ({mix}): raw onnxruntime, batch {limit.batch:.0f}, spinning {_spin(limit.spinning)}: "
                f"{limit.windows_per_s:.1f} windows/s, {_num(limit.cpu_ms_per_window, '.1f')} CPU ms/window"
            )
            for r in self.rows:
                if r.mix == mix and r.mode == "service" and r.clients == 1 and r.added_p50_ms is not None:
                    line += (
                        f"; 1 client: added p50 {r.added_p50_ms:+.2f} ms over raw request by request "
                        f"(raw p50 {_num(r.raw_p50_ms, '.2f')} ms)"
                    )
            for r in self.rows:
                if r.mix == mix and r.mode == "service" and r.clients != 1:
                    via = f" {r.note}" if r.note else ""
                    line += f"; {r.clients} clients{via}: {_num(r.pct_of_limit, '.0f', ' %')} of limit"
            out.append(line)
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "machine": self.machine,
                "settings": self.settings,
                "limits": {mix: asdict(r) for mix, r in self.limits.items()},
                "rows": [asdict(r) for r in self.rows],
            },
            indent=2,
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
            ["pgrep", "-af", "python.* -m training|pytest|locust"], capture_output=True, text=True, timeout=5
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
    """The model alone on one mix's pre-tokenised windows: the candidates for the limit.

    ``models`` maps onnxruntime's intra-op spinning (on / off; the service turns it off to
    leave the CPU to its event loop) to a session; every (batch size, spinning) pair is a
    configuration of its own, measured once and cached.
    """

    def __init__(self, models: dict[bool, OnnxModel], encoded: list[EncodedWindows], mix: str = "") -> None:
        self.models = models
        self.encoded = encoded
        self.mix = mix
        rows = [
            (ids, m, t)
            for e in encoded
            for ids, m, t in zip(e.input_ids, e.attention_mask, e.token_type_ids, strict=True)
        ]
        self.rows = sorted(rows, key=lambda r: len(r[0]))
        self.windows_per_request = len(rows) / len(encoded)
        self._cache: dict[tuple[int, bool], Row] = {}

    def _feeds(
        self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, mask, types = zip(*rows, strict=True)
        return _pad(list(ids), self.models[True].pad_id), _pad(list(mask), 0), _pad(list(types), 0)

    def sweep_sizes(self, batches: Sequence[int]) -> list[int]:
        """The batch sizes worth measuring: those the mix has windows for (else its whole size)."""
        sizes = sorted({b for b in batches if 1 <= b <= len(self.rows)})
        return sizes or [len(self.rows)]

    def at_batch(self, batch: int, spinning: bool, seconds: float) -> Row:
        """Throughput over length-sorted batches of ``batch`` windows, visited in a shuffled
        order, for ``seconds`` (and at least 3 calls), with spinning on or off."""
        key = (batch, spinning)
        if key in self._cache:
            return self._cache[key]
        chunks = [self.rows[i : i + batch] for i in range(0, len(self.rows), batch)]
        chunks = [c for c in chunks if len(c) == batch] or chunks
        rng = np.random.default_rng(0)
        order = rng.permutation(len(chunks))
        feeds = [self._feeds(chunks[i]) for i in order]
        model = self.models[spinning]
        model.run(*feeds[0])  # warm this shape
        times: list[float] = []
        padded = real = 0
        done_windows = 0
        started = time.perf_counter()
        cpu0 = time.process_time()
        i = 0
        while time.perf_counter() - started < seconds or len(times) < 3:
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
        row = Row(
            "raw",
            None,
            done_windows / len(times),
            done_windows / elapsed / self.windows_per_request,
            p50,
            p95,
            p99,
            mix=self.mix,
            spinning=spinning,
            requests=int(done_windows / self.windows_per_request),
            padding=1 - real / padded,
            windows_per_s=done_windows / elapsed,
            cpu_ms_per_window=(time.process_time() - cpu0) * 1e3 / done_windows,
        )
        self._cache[key] = row
        return row

    def best_at_batch(self, batch: int, seconds: float) -> Row:
        """Raw at one batch size, the better of spinning on and off (the secondary reference)."""
        return best_config(self.at_batch(batch, spin, seconds) for spin in self.models)

    def measured(self) -> list[Row]:
        """Every configuration measured so far, by batch size then spinning on before off."""
        return [self._cache[k] for k in sorted(self._cache, key=lambda k: (k[0], not k[1]))]

    def per_request(self, indices: list[int]) -> tuple[Row, dict[int, float]]:
        """The given requests one at a time, each request's windows as one call: the model
        time a lone caller cannot avoid (per request the faster of spinning on and off).
        Returns the row and each index's time."""
        feeds = {}
        for i in dict.fromkeys(indices):
            e = self.encoded[i % len(self.encoded)]
            feeds[i] = self._feeds(list(zip(e.input_ids, e.attention_mask, e.token_type_ids, strict=True)))
        times: dict[int, float] = {}
        windows = {i: f[0].shape[0] for i, f in feeds.items()}
        cpu_ms = float("inf")
        for model in self.models.values():
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
            mix=self.mix,
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


# Routes the service rows can drive with the same requests (``--routes``).
ROUTES = {"classify": "/v1/classify", "moderations": "/v1/moderations"}


def route_body(route: str, request: dict[str, str]) -> bytes:
    """One request of the mix (a prompt and a policy id) as ``route`` takes it: the same text and
    policy, so the model does the same work whichever route carries it."""
    if route == "moderations":  # OpenAI's shape; model names the policy
        return encode_post("127.0.0.1", ROUTES[route], {"input": request["prompt"], "model": request["policy_id"]})
    return encode_post("127.0.0.1", ROUTES[route], request)


def apply_limit(rows: Iterable[Row], limit: Row) -> None:
    """Fill every row's "% of limit" (windows/s) and "% of limit, CPU" against ``limit``."""
    for r in rows:
        r.pct_of_limit = 100.0 * r.windows_per_s / limit.windows_per_s if limit.windows_per_s else None
        if r.cpu_ms_per_window and limit.cpu_ms_per_window:
            r.pct_of_limit_cpu = 100.0 * limit.cpu_ms_per_window / r.cpu_ms_per_window
        r.limit = r is limit


def run(
    model_dir: Path,
    *,
    concurrency: tuple[int, ...] = (1, 8, 64),
    seconds: float = 10.0,
    warmup: float = 2.0,
    raw_seconds: float = 3.0,
    raw_batches: Sequence[int] = RAW_BATCHES,
    mixes: Sequence[str] = ("short", "long"),
    threads: int | None = None,
    n_requests: int = 2000,
    max_chars: int | None = None,
    service_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    progress: bool = True,
    provider: str = "auto",
    routes: Sequence[str] = ("classify",),
) -> Report:
    threads = threads or os.cpu_count() or 1
    if not routes or any(r not in ROUTES for r in routes):
        raise ValueError(f"routes must be some of {', '.join(ROUTES)}, got {list(routes)}")
    unknown = [m for m in mixes if m not in MIXES]
    if unknown or not mixes:
        raise ValueError(f"mixes must be some of {', '.join(MIXES)}, got {list(mixes)}")

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    report = Report(
        machine_info(threads),
        {
            "model_dir": str(model_dir),
            "mixes": list(mixes),
            "concurrency": list(concurrency),
            "seconds": seconds,
            "raw_seconds": raw_seconds,
            "raw_batches": list(raw_batches),
            "requests": n_requests,
            "max_chars": max_chars,
            "service_env": service_env or {},
            "routes": list(routes),
        },
    )
    policies = load_policies(DEFAULT_POLICIES_DIR)
    log_root = log_dir or REPO / "runs" / "bench"
    env = {
        "UNIGUARD_REQUEST_TIMEOUT_S": "300",  # throughput, not shedding
        "UNIGUARD_PROVIDER": provider,
        # The mix repeats once the clients have gone through it: the model must score every
        # request, as raw onnxruntime does, not answer repeats from the verdict cache.
        "UNIGUARD_VERDICT_CACHE_ENTRIES": "0",
        **(service_env or {}),
    }
    models = {spin: OnnxModel.load(model_dir, threads, provider=provider, spinning=spin) for spin in (True, False)}
    report.machine["provider"] = f"{models[True].provider} ({models[True].precision})"

    # Interleaved, so a machine whose load drifts treats both alike: each client count runs
    # against a fresh service, then (service stopped, never sharing the CPU) raw onnxruntime
    # on the same work: the same requests one by one at one client, else the batch size the
    # service ran. The rest of the raw sweep closes each mix; its best is the mix's limit.
    for mix in mixes:
        requests = build_requests(n_requests, max_chars=max_chars, mix=mix)
        bodies = {route: [route_body(route, r) for r in requests] for route in dict.fromkeys(routes)}
        encoded = [models[True].encoder.encode(policies[r["policy_id"]], r["prompt"]) for r in requests]
        raw = Raw(models, encoded, mix)
        say(f"mix {mix}: {len(requests)} requests, {raw.windows_per_request:.2f} windows a request")
        sweep = raw.sweep_sizes(raw_batches)
        service_rows: list[Row] = []
        single: Row | None = None
        for c, route in ((c, route) for c in concurrency for route in routes):
            service = ServiceProcess(Path(model_dir), threads, env, log_root / f"service-{mix}-{c}-{route}.log")
            try:
                asyncio.run(service.wait_ready(READY_TIMEOUT_S))
                say(f"service ({mix}, {ROUTES[route]}): {c} client(s), {seconds:.0f} s measured ...")
                row, samples = asyncio.run(bench_service(service, bodies[route], c, seconds, warmup))
            finally:
                service.stop()
            say(f"  {row.rps:.1f} req/s, {row.windows_per_s:.1f} windows/s, p50 {row.p50_ms:.1f} ms, {row.errors} err")
            row.mix = mix
            if tuple(routes) != ("classify",):
                row.note = ROUTES[route]
            if c == 1:
                say(f"raw onnxruntime ({mix}): the {len(samples)} requests of the 1-client run, one by one ...")
                single, single_times = raw.per_request([i for i, _ in samples])
                # Paired: the same requests, service latency minus model time, median over requests.
                row.added_p50_ms = float(np.median([lat - single_times[i] for i, lat in samples])) * 1e3
                row.raw_p50_ms = single.p50_ms
                row.pct_of_raw_same_batch = 100.0 * row.rps / single.rps if single.rps else None
            else:
                b = max(1, round(row.batch))
                say(f"raw onnxruntime ({mix}): batches of {b} (the service's) ...")
                same = raw.best_at_batch(b, raw_seconds)
                if b not in sweep:
                    for spin in models:
                        cfg = raw.at_batch(b, spin, raw_seconds)
                        cfg.note = cfg.note or f"(batch of the {c}-client service)"
                # Model work per second, so the share does not depend on which requests fell in the window.
                row.pct_of_raw_same_batch = (
                    100.0 * row.windows_per_s / same.windows_per_s if same.windows_per_s else None
                )
            service_rows.append(row)
        for b in sweep:
            say(f"raw onnxruntime ({mix}): batches of {b}, spinning on and off ...")
            for spin in models:
                raw.at_batch(b, spin, raw_seconds)
        raw_rows = raw.measured()
        limit = best_config(raw_rows)
        rows = ([single] if single is not None else []) + raw_rows + service_rows
        apply_limit(rows, limit)
        report.limits[mix] = limit
        report.rows.extend(rows)
    report.machine["load_average_after"] = os.getloadavg()
    return report
