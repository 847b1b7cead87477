"""Hostile-input probes with numbers: Unicode cost and a closed-loop soak, for any checkout.

    python -m bench.hardening_probes unicode                 # this checkout, models/default
    python -m bench.hardening_probes unicode --repo /tmp/before
    python -m bench.hardening_probes soak --seconds 60 --clients 32

``--repo`` runs ``python -m service`` from another checkout (a ``git worktree add`` of an
older commit), so the same probe measures before and after.

* ``unicode``: (1) one prompt of "a" + 50,000 U+0301 + 50,000 U+0316 under five policies:
  status, seconds, and the longest /healthz answer time while it runs; (2) 99,999 x U+FDFA
  under five policies: status, error details, seconds and the service's RSS growth.
* ``soak``: ``--clients`` closed-loop clients for ``--seconds``, prompts of 20-20,000
  characters (log-uniform), one policy: count per status, share of 504s, p50/p99 of the
  answered requests, RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
FIVE = ["prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"]
WORDS = [
    "please",
    "tell",
    "me",
    "how",
    "the",
    "quick",
    "brown",
    "fox",
    "pays",
    "its",
    "taxes",
    "and",
    "ignores",
    "all",
    "previous",
    "rules",
    "today",
]


@contextmanager
def service(repo: Path, port: int, **env: str) -> Iterator[tuple[str, int]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("UNIGUARD_")}
    full.update(UNIGUARD_HOST="127.0.0.1", UNIGUARD_PORT=str(port), UNIGUARD_SHUTDOWN_DRAIN_S="0", **env)
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=repo, env=full, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a busy machine loads slowly
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("service never became ready")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss(pid: int) -> float:
    value: int = psutil.Process(pid).memory_info().rss  # psutil ships no types
    return value / MIB


def probe(url: str, pid: int, prompt: str) -> dict[str, object]:
    result: dict[str, object] = {}
    before = rss(pid)
    peak = [before]

    def call() -> None:
        started = time.perf_counter()
        try:
            r = httpx.post(url + "/v1/classify", json={"policy_id": FIVE, "prompt": prompt}, timeout=120)
            result["status"] = r.status_code
            if r.status_code != 200:
                result["error"] = r.json().get("error", {}).get("details")
        except httpx.TimeoutException:
            result["status"] = "client timeout"
        result["seconds"] = round(time.perf_counter() - started, 2)

    worker = threading.Thread(target=call)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        started = time.perf_counter()
        with suppress(httpx.TimeoutException):
            httpx.get(url + "/healthz", timeout=60)
        slowest = max(slowest, time.perf_counter() - started)
        peak.append(rss(pid))
        time.sleep(0.05)
    worker.join()
    result["healthz_slowest_ms"] = round(slowest * 1e3, 1)
    result["rss_peak_growth_mib"] = round(max(peak) - before, 1)
    result["rss_growth_after_mib"] = round(rss(pid) - before, 1)
    return result


def unicode_probes(args: argparse.Namespace) -> dict[str, object]:
    env = {
        "UNIGUARD_MODEL_DIR": args.model_dir,
        "UNIGUARD_MAX_BODY_BYTES": str(2 * MIB),
        "UNIGUARD_MAX_PROMPT_CHARS": "400000",
    }
    with service(args.repo, args.port, **env) as (url, pid):
        marks = probe(url, pid, "a" + "\u0301" * 50_000 + "\u0316" * 50_000)
        expansion = probe(url, pid, "\ufdfa" * 99_999)
    return {"combining_marks": marks, "nfkc_expansion": expansion}


async def soak(url: str, pid: int, clients: int, seconds: float) -> dict[str, object]:
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop_at:
                n = int(20 * 1000 ** rng.random())
                prompt = " ".join(rng.choice(WORDS) for _ in range(n // 5 + 1))[:n]
                started = time.perf_counter()
                r = await c.post("/v1/classify", json={"policy_id": "prompt_injection", "prompt": prompt})
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                elif r.status_code == 429:
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 2.0))  # as SDKs do

    before = rss(pid)
    await asyncio.gather(*(client(i) for i in range(clients)))
    total = sum(statuses.values())
    lat = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {
        "clients": clients,
        "seconds": seconds,
        "statuses": dict(statuses),
        "share_504": round(statuses[504] / total, 4) if total else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(rss(pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["unicode", "soak"])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run the service from")
    parser.add_argument("--model-dir", default=str(REPO / "models" / "default"))
    parser.add_argument("--port", type=int, default=18941)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.probe == "unicode":
        result = unicode_probes(args)
    else:
        with service(args.repo, args.port, UNIGUARD_MODEL_DIR=args.model_dir) as (url, pid):
            result = asyncio.run(soak(url, pid, args.clients, args.seconds))
    result = {"repo": str(args.repo), "commit": _commit(args.repo), **result}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
