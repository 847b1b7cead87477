"""Prompts never reach logs or metrics unless UNIGUARD_LOG_PROMPTS says so, on any route.

A marker string is sent everywhere a prompt or an answer can travel (classify with served,
listed and inline policies, error paths, the LiteLLM guardrail, the OpenAI proxy with
output moderation, streamed and not); the live server's whole log and /metrics must not
contain it, while every access-log line is JSON with the request id the response echoed.
The same traffic with log_prompts on must show the marker: the grep can see it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import Server
from tests.harness.upstream import UpstreamServer
from tests.service.sidecar import servers

MARKER = "okapi-privacy-marker-4471"
KEY = "privacy-key-1"
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def pair(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer
) -> Iterator[dict[str, Server]]:
    common = {
        "UNIGUARD_MODEL_DIR": str(tiny_model_dir),
        "UNIGUARD_API_KEY": KEY,
        "UNIGUARD_UPSTREAM_BASE_URL": upstream.base_url,
        "UNIGUARD_GUARD_POLICIES": "prompt_injection,toxicity",
        "UNIGUARD_MODERATE_OUTPUT": "true",
        "UNIGUARD_MAX_PROMPT_CHARS": "5000",
    }
    specs = {"private": {**common}, "logging": {**common, "UNIGUARD_LOG_PROMPTS": "true"}}
    with servers(tmp_path_factory.mktemp("privacy"), specs) as running:
        yield running


def send_everything(server: Server) -> list[tuple[str, httpx.Response]]:
    """Every route, with the marker wherever text goes; returns (sent request id, response)."""
    sent: list[tuple[str, httpx.Response]] = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:

        def post(path: str, body: object, rid: str, **headers: str) -> None:
            sent.append(
                (
                    rid,
                    c.post(
                        path,
                        content=json.dumps(body),
                        headers={"x-request-id": rid, "content-type": "application/json", **headers},
                    ),
                )
            )

        post("/v1/classify", {"policy_id": "toxicity", "prompt": f"tell me about {MARKER}"}, "p-1")
        post("/v1/classify", {"policy_id": ["toxicity", "tax_advice"], "prompt": f"{MARKER} list"}, "p-2")
        post(
            "/v1/classify",
            {
                "policy": {"id": "inline_x", "name": f"name {MARKER}", "description": f"Block {MARKER}."},
                "prompt": f"inline {MARKER}",
            },
            "p-3",
        )
        post("/v1/classify", {"policy_id": "toxicity", "prompt": MARKER * 400}, "p-4")  # 413 prompt_too_long
        post(
            "/v1/classify", {"policy_id": "toxicity", "prompt": f"x {MARKER}", "extra": MARKER}, "p-5"
        )  # 422 extra field
        post("/v1/classify", {"policy_id": "nope", "prompt": f"unknown policy {MARKER}"}, "p-6")  # 404
        post("/v1/classify", {"policy_id": "toxicity", "prompt": f"{MARKER} \ud800"}, "p-7")  # 422 lone surrogate
        sent.append(
            (
                "p-8",
                c.post(
                    "/v1/classify",
                    content=f'{{"policy_id": "toxicity", "prompt": "{MARKER}'.encode(),
                    headers={"x-request-id": "p-8"},
                ),
            )
        )  # bad JSON
        post(
            "/beta/litellm_basic_guardrail_api",
            {"texts": [f"guard {MARKER}", MARKER], "input_type": "request", "litellm_call_id": "call-1"},
            "p-9",
        )
        post("/beta/litellm_basic_guardrail_api", {"texts": [f"answer {MARKER}"], "input_type": "response"}, "p-10")
        post(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": f"chat {MARKER}"}]},
            "p-11",
            **{"x-upstream-answer": f"the answer mentions {MARKER}"},
        )
        post(
            "/v1/chat/completions",
            {
                "model": "m",
                "stream": True,
                "messages": [{"role": "user", "content": [{"type": "text", "text": f"parts {MARKER}"}]}],
            },
            "p-12",
        )
        for i, path in enumerate(("/healthz", "/readyz", "/metrics", "/v1/policies", "/openapi.json")):
            sent.append((f"g-{i}", c.get(path, headers={"x-request-id": f"g-{i}"})))
        sent.append(("", c.post("/admin/reload")))  # no id sent: one is generated
    return sent


def access_lines(server: Server) -> list[dict]:
    return [
        rec
        for rec in (json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{"))
        if rec.get("logger") == "uniguard.access"
    ]


def test_no_prompt_in_logs_or_metrics_and_request_ids_everywhere(pair: dict[str, Server]) -> None:
    server = pair["private"]
    sent = send_everything(server)
    statuses = {rid: r.status_code for rid, r in sent}
    assert statuses["p-1"] == statuses["p-2"] == statuses["p-3"] == 200
    assert (statuses["p-4"], statuses["p-5"], statuses["p-6"], statuses["p-7"], statuses["p-8"]) == (
        413,
        422,
        404,
        422,
        422,
    )
    assert statuses["p-9"] == statuses["p-10"] == statuses["p-11"] == statuses["p-12"] == 200
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert MARKER not in metrics and "inline_x" not in metrics  # inline policies are labelled "inline"
    lines = access_lines(server)
    by_id = {rec["request_id"]: rec for rec in lines}
    for rid, r in sent:
        echoed = r.headers["x-request-id"]
        if rid:
            assert echoed == rid
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", echoed)
        rec = by_id[echoed]  # one JSON access line per request, under the id the client saw
        assert rec["status"] == r.status_code and rec["method"] in ("GET", "POST") and rec["latency_ms"] >= 0
    assert by_id["p-1"]["prompt_chars"] == len(f"tell me about {MARKER}") and "prompt" not in by_id["p-1"]
    text = server.log.read_text()
    assert MARKER not in text, [line for line in text.splitlines() if MARKER in line][:3]


def test_log_prompts_on_does_log_them(pair: dict[str, Server]) -> None:
    """The control: the same traffic with UNIGUARD_LOG_PROMPTS=true shows the marker."""
    server = pair["logging"]
    send_everything(server)
    rec = {r["request_id"]: r for r in access_lines(server)}["p-1"]
    assert rec["prompt"] == f"tell me about {MARKER}"
    assert MARKER not in httpx.get(server.url + "/metrics", headers=AUTH).text  # never in metrics
