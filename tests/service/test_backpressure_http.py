"""Back-pressure over real HTTP: a full queue answers 429 with Retry-After at once, a missed
deadline 504, both in the error shape and counted as rejections (200 answers and their
timing headers: test_http)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import Server, assert_error, serve


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One window fits in the queue, and it waits 5 s there for company: long enough to fill
    # the queue on purpose and to miss a 1 s deadline, with room for a saturated CPU (the test
    # waits on the queue-depth gauge, not on a sleep).
    log = tmp_path_factory.mktemp("slow") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_MAX_QUEUE="1",
        UNIGUARD_MAX_WAIT_MS="5000",
        UNIGUARD_REQUEST_TIMEOUT_S="1",
    ) as s:
        s.wait("/readyz", 200)
        yield s


def wait_for_queue_depth(server: Server, depth: int, timeout: float = 5.0) -> None:
    """Poll the gauge rather than sleep: under a saturated CPU the first request may take longer
    than any fixed pause to reach the queue."""
    line = f"uniguard_queue_depth {float(depth)}"
    deadline = time.monotonic() + timeout
    while line not in httpx.get(server.url + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline, f"the queue never held {depth} window(s)"
        time.sleep(0.01)


def test_full_queue_is_429_at_once_and_deadline_is_504(slow_server: Server) -> None:
    body = {"policy_id": "toxicity", "prompt": "hello"}
    first: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: first.setdefault("r", httpx.post(slow_server.url + "/v1/classify", json=body, timeout=10))
    )
    t.start()
    wait_for_queue_depth(slow_server, 1)  # the first window now waits in the queue
    started = time.perf_counter()
    r = httpx.post(slow_server.url + "/v1/classify", json=body, timeout=10)
    elapsed = time.perf_counter() - started
    assert_error(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) >= 1
    assert elapsed < 1.0, f"429 took {elapsed:.3f} s: shedding must not wait for the queue (5 s)"
    t.join()
    err = assert_error(first["r"], 504, "deadline_exceeded")
    assert "within 1.0 s" in err["message"]
    m = httpx.get(slow_server.url + "/metrics").text
    assert 'uniguard_rejected_total{reason="queue_full"} 1.0' in m
    assert 'uniguard_rejected_total{reason="deadline_exceeded"} 1.0' in m
