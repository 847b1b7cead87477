"""Bounded reads: clients dripping a request head or body are cut off, others are not slowed.

Raw sockets against the real service (``python -m service``) with short timeouts. The
bounds on elapsed time are generous (the behaviour itself is about time, and the box is
shared): they only tell "cut after the timeout" from "never cut".
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import Server, serve

HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 1.0
CUT_WITHIN_S = 4.0  # generous: a cut connection is seen far below this; an uncut one never
DRIP_FOR_S = 8.0  # a dripping client keeps going this long unless cut


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("read-timeouts") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        UNIGUARD_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    ) as s:
        s.wait("/readyz", 200)
        yield s


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DRIP_FOR_S + 5)
    return sock


def _drip(sock: socket.socket, head: bytes, piece: bytes, every_s: float) -> tuple[float, bytes]:
    """Send ``head``, then ``piece`` every ``every_s`` until the server closes (or DRIP_FOR_S):
    (seconds until the server closed, everything it sent)."""
    started = time.monotonic()
    sock.sendall(head)
    sock.settimeout(every_s)
    got = b""
    while time.monotonic() - started < DRIP_FOR_S:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(piece)
            except OSError:  # reset: the server closed
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - started, got


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _healthz_while(server: Server, busy: threading.Event) -> list[float]:
    """Latencies of /healthz calls made by a normal client while ``busy`` is set."""
    out: list[float] = []
    with httpx.Client(base_url=server.url, timeout=5) as c:
        while busy.is_set():
            t = time.monotonic()
            assert c.get("/healthz").status_code == 200
            out.append(time.monotonic() - t)
            time.sleep(0.05)
    return out


def test_dripping_headers_get_408_and_are_cut_while_others_are_served(server: Server) -> None:
    busy = threading.Event()
    busy.set()
    latencies: list[float] = []
    t = threading.Thread(target=lambda: latencies.extend(_healthz_while(server, busy)))
    t.start()
    try:
        with _connect(server) as sock:
            elapsed, got = _drip(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 0.1)
    finally:
        busy.clear()
        t.join()
    assert elapsed < CUT_WITHIN_S, f"not cut after {elapsed:.1f} s"
    status, body = _status_and_body(got)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert latencies and max(latencies) < 2.0  # the normal client was answered all along


def test_silent_connection_is_closed(server: Server) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed without an answer: nothing was asked
        assert time.monotonic() - started < CUT_WITHIN_S


def test_dripping_body_gets_408_and_is_cut(server: Server) -> None:
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"policy_id": "toxicity", "prompt": "'
    )
    with _connect(server) as sock:
        elapsed, got = _drip(sock, head, b"a", 0.1)
    assert elapsed < CUT_WITHIN_S, f"not cut after {elapsed:.1f} s"
    status, body = _status_and_body(got)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert b"connection: close" in got.lower()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'uniguard_errors_total{code="request_timeout"} 1.0' in metrics


def test_keep_alive_idle_is_not_a_header_timeout_and_slow_but_timely_requests_pass(server: Server) -> None:
    body = b'{"policy_id": "toxicity", "prompt": "hello"}'
    request = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with _connect(server) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request[:20])
            time.sleep(HEADER_TIMEOUT_S / 4)
            sock.sendall(request[20:] + body[:10])
            time.sleep(BODY_TIMEOUT_S / 4)
            sock.sendall(body[10:])
            status_line = reader.readline()
            assert b" 200 " in status_line, status_line
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(reader.read(length))["policy_id"] == "toxicity"
            time.sleep(HEADER_TIMEOUT_S * 2)  # idle between requests: uvicorn's keep-alive (5 s) rules, not ours
