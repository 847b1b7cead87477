"""SIGTERM under load: readiness turns false first, every accepted request is answered, then
the process exits.

"Accepted" is read from the server's own access log (one line per request that reached the
app, with the request id the client chose): a request the client saw fail must not be in
it (it was refused before acceptance: connection refused or closed before it was read),
and every request in it must have reached the client with its status.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import serve

DRAIN_S = 1.0
LONG = " ".join(f"word{i}" for i in range(500))  # ~25 windows: keeps the batcher queue busy


def test_sigterm_under_load_drops_no_accepted_request(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "server.log"
    outcomes: dict[str, tuple[str, object, float]] = {}  # request id -> (kind, status | exception name, time)
    ready_probe: list[tuple[float, int | str]] = []
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_SHUTDOWN_DRAIN_S=str(DRAIN_S),
        UNIGUARD_MAX_WAIT_MS="20",
        UNIGUARD_MAX_BATCH_SIZE="8",
        UNIGUARD_REQUEST_TIMEOUT_S="20",
    ) as server:
        server.wait("/readyz", 200)
        proc = server.proc

        async def worker(n: int, stop: asyncio.Event) -> None:
            i = 0
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    rid = f"w{n}-{i}"
                    i += 1
                    prompt = LONG if i % 4 == 0 else f"request {rid}: is this fine?"
                    try:
                        r = await client.post(
                            "/v1/classify",
                            json={"policy_id": "toxicity", "prompt": prompt},
                            headers={"x-request-id": rid},
                        )
                        outcomes[rid] = ("response", r.status_code, time.monotonic())
                    except httpx.TransportError as exc:
                        outcomes[rid] = ("error", type(exc).__name__, time.monotonic())
                        await asyncio.sleep(0.02)

        async def probe(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    r = httpx.get(server.url + "/readyz", timeout=2)  # new connection each time
                    ready_probe.append((time.monotonic(), r.status_code))
                except httpx.TransportError as exc:
                    ready_probe.append((time.monotonic(), type(exc).__name__))
                await asyncio.sleep(0.05)

        async def main() -> float:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(worker(n, stop)) for n in range(12)]
            prober = asyncio.create_task(probe(stop))
            await asyncio.sleep(1.5)
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            deadline = sent_at + DRAIN_S + 30
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a few refused attempts after exit
            stop.set()
            await asyncio.gather(*tasks, prober)
            return sent_at

        sent_at = asyncio.run(main())
        assert proc.poll() is not None, "server did not exit after SIGTERM"
        assert proc.returncode in (0, -signal.SIGTERM), proc.returncode

    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    accepted = {
        rec["request_id"]: rec["status"]
        for rec in lines
        if rec.get("logger") == "uniguard.access" and rec.get("path") == "/v1/classify"
    }
    dropped = [rid for rid, (kind, _, _) in outcomes.items() if kind == "error" and rid in accepted]
    unanswered = [rid for rid in accepted if rid not in outcomes or outcomes[rid][0] != "response"]
    # 503 not_ready / 429 queue_full are refusals the client can retry elsewhere; anything else is not.
    bad_status = {rid: o for rid, o in outcomes.items() if o[0] == "response" and o[1] not in (200, 429, 503)}
    after = [o for o in outcomes.values() if o[2] > sent_at]
    served_after = sum(1 for kind, status, _ in after if kind == "response" and status == 200)
    refused = Counter(status for kind, status, _ in after if kind != "response" or status != 200)
    with capsys.disabled():
        print(
            f"\nSIGTERM under load: {len(outcomes)} requests, {len(accepted)} accepted by the app, "
            f"{served_after} answered 200 after SIGTERM, refused before acceptance {dict(refused)}, dropped "
            f"{len(dropped)}"
        )
    assert not dropped, dropped[:10]
    assert not unanswered, unanswered[:10]
    assert not bad_status, list(bad_status.items())[:10]
    assert all(status in (200, 429, 503) for status in accepted.values())
    assert served_after > 0, "nothing was in flight or served during the drain"

    # Readiness turned false while requests were still being answered (the drain), then
    # connections were refused.
    first_503 = next(t for t, status in ready_probe if t > sent_at and status == 503)
    last_ok = max(t for kind, status, t in outcomes.values() if kind == "response" and status == 200)
    assert first_503 < last_ok, "readiness must turn false before the service stops answering"
    assert first_503 - sent_at < 0.5
    statuses_after = [s for t, s in ready_probe if t > sent_at]
    assert 200 not in statuses_after
    text = log.read_text()
    assert "draining" in text and "Application shutdown complete" in text


def test_sigint_skips_the_drain(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serve(
        tmp_path / "server.log", UNIGUARD_MODEL_DIR=str(tiny_model_dir), UNIGUARD_SHUTDOWN_DRAIN_S="30"
    ) as server:
        server.wait("/readyz", 200)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(15)
        assert time.monotonic() - started < 10
