"""The real service in a subprocess (``python -m service`` under uvicorn), driven over HTTP."""

from __future__ import annotations

import asyncio
import json
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
MAX_BODY = 200_000
MAX_POLICIES = 3
MAX_PROMPT_CHARS = 50_000
MARKER = "zebra-marker-7731"  # must never reach the logs


def _free_port() -> int:
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
    port = _free_port()
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


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_MAX_WAIT_MS="10",
        UNIGUARD_MAX_BODY_BYTES=str(MAX_BODY),
        UNIGUARD_MAX_POLICIES_PER_REQUEST=str(MAX_POLICIES),
        UNIGUARD_MAX_PROMPT_CHARS=str(MAX_PROMPT_CHARS),
    ) as s:
        s.wait("/readyz", 200)
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


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


def test_concurrent_requests_are_batched(server: Server) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(
                *(
                    c.post("/v1/classify", json={"policy_id": "prompt_injection", "prompt": f"request number {i}"})
                    for i in range(24)
                )
            )

    before = httpx.get(server.url + "/metrics").text
    for r in asyncio.run(burst()):
        assert r.status_code == 200, r.text
        body = r.json()
        assert_verdict(body, "prompt_injection")
        assert body["model"].startswith("tiny-test@") and set(body["latency_ms"]) == LATENCY_KEYS
    after = httpx.get(server.url + "/metrics").text
    windows = metric(after, "uniguard_batch_size_sum") - metric(before, "uniguard_batch_size_sum")
    batches = metric(after, "uniguard_batch_size_count") - metric(before, "uniguard_batch_size_count")
    assert windows == 24 and batches < 24  # at least one batch held more than one request
    assert 'uniguard_requests_total{policy="prompt_injection",verdict=' in after
    assert metric(after, "uniguard_queue_depth") == 0


def test_single_policy_response_and_headers(client: httpx.Client) -> None:
    r = client.post(
        "/v1/classify", json={"policy_id": "toxicity", "prompt": "hello"}, headers={"x-request-id": "abc-123"}
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    for h in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(r.headers[h]) >= 0
    body = r.json()
    assert_verdict(body, "toxicity")
    assert body["threshold"] == 0.5 and body["windows"] == 1
    r2 = client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r2.headers["x-request-id"])


def test_list_of_policy_ids(client: httpx.Client) -> None:
    r = client.post("/v1/classify", json={"policy_id": ["toxicity", "tax_advice", "toxicity"], "prompt": "hello"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [v["policy_id"] for v in body["results"]] == ["toxicity", "tax_advice"]
    for v in body["results"]:
        assert_verdict(v, v["policy_id"])
    assert body["unsafe"] == any(v["unsafe"] for v in body["results"])
    assert set(body["latency_ms"]) == LATENCY_KEYS and body["model"]


def test_inline_policy(client: httpx.Client) -> None:
    policy = {"id": "no_cats", "name": "No cats", "description": "Block any prompt that talks about cats."}
    r = client.post("/v1/classify", json={"policy": policy, "prompt": "I love my cat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_verdict(body, "no_cats")
    assert body["threshold"] == 0.5  # zero-shot default
    metrics = client.get("/metrics").text
    assert 'policy="inline"' in metrics and 'policy="no_cats"' not in metrics


def test_long_prompt_is_windowed(client: httpx.Client) -> None:
    prompt = " ".join(f"word{i}" for i in range(3000))
    r = client.post("/v1/classify", json={"policy_id": "prompt_injection", "prompt": prompt})
    assert r.status_code == 200, r.text
    assert r.json()["windows"] > 1


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"policy_id": "nope", "prompt": "hi"}, 404, "unknown_policy"),
        ({"policy_id": "toxicity", "prompt": "  \n\t"}, 422, "empty_prompt"),
        ({"policy_id": "toxicity", "prompt": ""}, 422, "empty_prompt"),
        ({"policy_id": "toxicity", "prompt": 42}, 422, "invalid_request"),
        ({"policy_id": 7, "prompt": "hi"}, 422, "invalid_request"),
        ({"prompt": "hi"}, 422, "invalid_request"),
        (
            {"policy_id": "toxicity", "policy": {"id": "x", "name": "x", "description": "x"}, "prompt": "hi"},
            422,
            "invalid_request",
        ),
        ({"policy_id": "toxicity", "prompt": "hi", "extra": 1}, 422, "invalid_request"),
        (
            {"policy_id": ["toxicity", "tax_advice", "financial_advice", "prompt_injection"], "prompt": "hi"},
            422,
            "too_many_policies",
        ),
        (
            {"policy": {"id": "long", "name": "l", "description": "forbidden " * 199}, "prompt": "hi"},
            422,
            "policy_too_long",
        ),
        ([1, 2], 422, "invalid_request"),
    ],
)
def test_error_bodies(client: httpx.Client, payload: object, status: int, code: str) -> None:
    err = assert_error(client.post("/v1/classify", json=payload), status, code)
    if code == "unknown_policy":
        assert err["details"]["unknown"] == ["nope"]


def test_malformed_json(client: httpx.Client) -> None:
    r = client.post(
        "/v1/classify", content=b'{"policy_id": "toxicity", "prompt": ', headers={"content-type": "application/json"}
    )
    err = assert_error(r, 422, "invalid_request")
    assert "JSON" in err["message"]


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_body_too_large_with_content_length(client: httpx.Client) -> None:
    big = json.dumps({"policy_id": "toxicity", "prompt": "a" * (MAX_BODY + 10)}).encode()
    r = client.post("/v1/classify", content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")


def test_body_too_large_chunked(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"policy_id": "toxicity", "prompt": "'
        for _ in range(30):
            yield b"a" * 10_000
        yield b'"}'

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, "body_too_large")
    # A chunked body under the limit still works.
    ok = client.post(
        "/v1/classify",
        content=iter([b'{"policy_id": "toxicity", ', b'"prompt": "hi"}']),
        headers={"content-type": "application/json"},
    )
    assert ok.status_code == 200, ok.text


def test_prompt_too_long(client: httpx.Client) -> None:
    r = client.post("/v1/classify", json={"policy_id": "toxicity", "prompt": "b " * MAX_PROMPT_CHARS})
    err = assert_error(r, 413, "prompt_too_long")
    assert err["details"]["max"] == MAX_PROMPT_CHARS


def test_policies_health_metrics(client: httpx.Client) -> None:
    body = client.get("/v1/policies").json()
    policies = {p["id"]: p for p in body["policies"]}
    assert {"prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"} <= set(policies)
    p = policies["prompt_injection"]
    assert p["trained"] is True and p["threshold"] == 0.5 and p["name"] and p["description"] and p["disallowed"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"].startswith("tiny-test@")
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in (
        "uniguard_request_latency_seconds",
        "uniguard_queue_time_seconds",
        "uniguard_tokenize_time_seconds",
        "uniguard_inference_time_seconds",
        "uniguard_batch_tokens",
        "uniguard_errors_total",
    ):
        assert name in m.text


def test_access_log_is_json_without_prompts(client: httpx.Client, server: Server) -> None:
    r = client.post(
        "/v1/classify",
        json={"policy_id": "toxicity", "prompt": f"say {MARKER}"},
        headers={"x-request-id": "log-check-1"},
    )
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "log-check-1" not in server.log.read_text():
        time.sleep(0.05)
    text = server.log.read_text()
    assert MARKER not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{") and "log-check-1" in line]
    (line,) = lines
    assert line["method"] == "POST" and line["path"] == "/v1/classify" and line["status"] == 200
    assert line["latency_ms"] > 0 and line["policies"] == ["toxicity"]


def test_missing_model_stays_up_not_ready(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serve(tmp_path / "server.log", UNIGUARD_MODEL_DIR=str(tmp_path / "no-such-model")) as s:
        s.wait("/healthz", 200)
        err = assert_error(s.wait("/readyz", 503), 503, "not_ready")
        deadline = time.monotonic() + 20
        while "loading" in err["message"] and time.monotonic() < deadline:
            time.sleep(0.1)
            err = assert_error(httpx.get(s.url + "/readyz"), 503, "not_ready")
        assert "no-such-model" in err["message"] and "does not exist" in err["message"]
        r = httpx.post(s.url + "/v1/classify", json={"policy_id": "toxicity", "prompt": "hi"})
        assert_error(r, 503, "not_ready")
        assert s.proc.poll() is None


def test_curl_style_body_without_json_content_type_is_read_as_json(client: httpx.Client) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded: the README's example must work."""
    body = b'{"policy_id": "toxicity", "prompt": "hello there"}'
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/v1/classify", content=body, headers=headers)
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["policy_id"] == "toxicity"
