"""The live service for tests: ``python -m service`` in a subprocess on a free loopback port.

``serve(log, **env)`` starts it (UNIGUARD_* settings as keyword arguments) and stops it on exit;
``Server.wait(path, status)`` waits until a route answers. The ``server`` and ``client``
fixtures (tests/service/conftest.py) hold one on the tiny model for a test module. Also here:
the checks every HTTP test makes of a verdict, an error body and a metric."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# Limits of the ``server`` fixture.
MAX_BODY = 200_000
MAX_POLICIES = 3
MAX_PROMPT_CHARS = 50_000
MARKER = "zebra-marker-7731"  # must never reach the logs


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def wait(self, path: str, status: int, timeout: float = 60.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + path, timeout=2)
                if r.status_code == status:
                    return r
                last = r.text
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.1)
        pytest.fail(f"{path} never answered {status} (last: {last}):\n{self.log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def serve(log: Path, **env: str) -> Iterator[Server]:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("UNIGUARD_")}
    # No SIGTERM drain delay by default: terminate() below should not wait for a load balancer.
    full_env.update(
        {
            "UNIGUARD_HOST": "127.0.0.1",
            "UNIGUARD_PORT": str(port),
            "UNIGUARD_THREADS": "1",
            "UNIGUARD_SHUTDOWN_DRAIN_S": "0",
            **env,
        }
    )
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        yield Server(f"http://127.0.0.1:{port}", proc, log)
    finally:
        stop_process(proc, 15)


VERDICT_KEYS = {"policy_id", "verdict", "unsafe", "score", "threshold", "windows"}
LATENCY_KEYS = {"queue", "tokenize", "inference", "total"}


def assert_verdict(v: dict, policy_id: str) -> None:
    assert v.keys() >= VERDICT_KEYS
    assert v["policy_id"] == policy_id and v["verdict"] in ("safe", "unsafe")
    assert v["unsafe"] == (v["verdict"] == "unsafe") == (v["score"] >= v["threshold"])
    assert 0.0 <= v["score"] <= 1.0 and v["windows"] >= 1


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert r.headers["x-request-id"]
    return body["error"]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))
