"""The real service in a subprocess (``python -m service`` under uvicorn), driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import (
    LATENCY_KEYS,
    MARKER,
    MAX_BODY,
    MAX_PROMPT_CHARS,
    Server,
    assert_error,
    assert_verdict,
    metric,
    serve,
)


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
