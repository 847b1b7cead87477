"""Reloads under load: does the service give back the memory of the models it swapped out?

    python -m bench.reload_soak                          # models/default, 60 reloads, 64 clients
    python -m bench.reload_soak --model-dir /tmp/tiny --reloads 10 --clients 8

Starts the service (``python -m service``, admin on for loopback), runs ``--clients``
closed-loop clients posting /v1/classify (five policies, prompts of 20-2,000 characters)
and, meanwhile, ``--reloads`` sequential POST /admin/reload. Prints the service's RSS
before the load, after the load and reloads, and after a short rest; every verdict's
status is counted (a reload must never fail a request).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from pathlib import Path

import httpx

from bench.hardening_probes import FIVE, WORDS, rss, service

REPO = Path(__file__).resolve().parents[1]
POLICIES = FIVE


async def run(url: str, pid: int, clients: int, reloads: int, seconds: float) -> dict[str, object]:
    statuses: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while not stop.is_set():
                n = rng.randint(20, 2000)
                prompt = " ".join(rng.choice(WORDS) for _ in range(n // 5 + 1))[:n]
                r = await c.post("/v1/classify", json={"policy_id": POLICIES, "prompt": prompt})
                statuses[r.status_code] += 1

    before = rss(pid)
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    outcomes: collections.Counter[bool] = collections.Counter()
    failures: list[str] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as admin:
        if not reloads:  # the baseline: the same load, no reload
            await asyncio.sleep(seconds)
        for _ in range(reloads):
            r = await admin.post("/admin/reload")
            ok = r.status_code == 200
            outcomes[ok] += 1
            if not ok and not failures:
                failures.append(r.text[:500])
    stop.set()
    await asyncio.gather(*tasks)
    after_load = rss(pid)
    await asyncio.sleep(5)
    return {
        "reloads": reloads,
        "reloads_ok": outcomes[True],
        "first_failure": failures[0] if failures else None,
        "seconds": round(time.perf_counter() - started, 1),
        "statuses": dict(statuses),
        "rss_before_mib": round(before, 1),
        "rss_after_reloads_mib": round(after_load, 1),
        "rss_after_rest_mib": round(rss(pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run the service from")
    parser.add_argument("--model-dir", default=str(REPO / "models" / "default"))
    parser.add_argument("--reloads", type=int, default=60)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="with --reloads 0: how long the load runs")
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    with service(args.repo, args.port, UNIGUARD_MODEL_DIR=args.model_dir, UNIGUARD_ADMIN_ENABLED="true") as (
        url,
        pid,
    ):
        result = asyncio.run(run(url, pid, args.clients, args.reloads, args.seconds))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
