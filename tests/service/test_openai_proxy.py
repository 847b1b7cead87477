"""The OpenAI-compatible guard proxy, end to end: the real service under uvicorn in front of
a real (scripted) upstream on a loopback port."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.live_server import MARKER, Server, assert_error, free_port
from tests.harness.upstream import UpstreamServer
from tests.service.sidecar import MIXED, chat, model_with_thresholds, post_json, servers, sse_events

REFUSAL = "Blocked by UniGuard test policy."
UPSTREAM_TIMEOUT_S = 2


pytestmark = pytest.mark.usefixtures("fresh_upstream")


@pytest.fixture(scope="module")
def srv(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer
) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("proxy")
    mixed = str(model_with_thresholds(tiny_model_dir, tmp / "mixed", MIXED))
    missing = str(tmp / "no-such-model")
    up = {"UNIGUARD_UPSTREAM_BASE_URL": upstream.base_url, "UNIGUARD_MAX_WAIT_MS": "1"}
    specs = {
        # guard_policies default [prompt_injection]: always safe with this model
        "allow": {**up, "UNIGUARD_MODEL_DIR": mixed, "UNIGUARD_UPSTREAM_TIMEOUT_S": str(UPSTREAM_TIMEOUT_S)},
        # toxicity: always unsafe, on input (user messages only) and on output
        "block": {
            **up,
            "UNIGUARD_MODEL_DIR": mixed,
            "UNIGUARD_GUARD_POLICIES": "toxicity",
            "UNIGUARD_MODERATE_OUTPUT": "true",
            "UNIGUARD_OUTPUT_POLICIES": '["toxicity"]',
            "UNIGUARD_REFUSAL_MESSAGE": REFUSAL,
        },
        "closed": {**up, "UNIGUARD_MODEL_DIR": missing},
        "open": {**up, "UNIGUARD_MODEL_DIR": missing, "UNIGUARD_FAIL_OPEN": "true", "UNIGUARD_MODERATE_OUTPUT": "true"},
        "down": {"UNIGUARD_MODEL_DIR": mixed, "UNIGUARD_UPSTREAM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"},
    }
    with servers(tmp, specs, ready={"closed": False, "open": False}) as out:
        yield out


@pytest.fixture(scope="module")
def clients(srv: dict[str, Server]) -> Iterator[dict[str, httpx.Client]]:
    cs = {name: httpx.Client(base_url=s.url, timeout=30) for name, s in srv.items()}
    try:
        yield cs
    finally:
        for c in cs.values():
            c.close()


# -- allowed: forwarded unchanged ----------------------------------------------------------


def test_allowed_request_arrives_byte_identical(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    raw = (
        '{"model":"m",  "messages": [ {"role":"system","content":"be brief"},'
        '{"role":"user","content":[{"type":"text","text":"caf\\u00e9 '
        '\u00e9t\u00e9"},{"type":"image_url","image_url":{"url":"data:x"}}]}],'
        '"temperature": 0.50, "unknown_field": {"kept": [1, 2.0, null]}}\n'
    ).encode()
    r = clients["allow"].post(
        "/v1/chat/completions",
        content=raw,
        headers={
            "content-type": "application/json",
            "authorization": "Bearer client-upstream-key",
            "x-custom": "1",
            "connection": "keep-alive, x-hop",
            "x-hop": "secret-hop",
        },
    )
    assert r.status_code == 200, r.text
    (rec,) = upstream.records
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.body == raw  # byte for byte
    assert rec.header("authorization") == "Bearer client-upstream-key" and rec.header("x-custom") == "1"
    assert rec.header("x-hop") is None and rec.header("connection") is None
    sent = {k.lower() for k in r.request.headers} - {"host", "content-length", "connection", "x-hop"}
    assert {k for k, _ in rec.headers} - {"host", "content-length"} == sent  # nothing added on the way
    # The answer comes back unchanged, with the upstream's headers.
    assert r.content == rec.sent_bytes
    assert r.headers["x-upstream-marker"] == "kept" and r.headers["x-uniguard-action"] == "allowed"
    assert r.json()["echo"]["unknown_field"] == {"kept": [1, 2.0, None]}


def test_streaming_passes_through_chunk_by_chunk(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    delay = 0.25
    received: list[tuple[float, bytes]] = []
    with clients["allow"].stream(
        "POST",
        "/v1/chat/completions",
        json=chat(stream=True),
        headers={"x-upstream-chunks": "4", "x-upstream-chunk-delay": str(delay)},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-uniguard-action"] == "allowed"
        for chunk in r.iter_raw():
            received.append((time.monotonic(), chunk))
    (rec,) = upstream.records
    assert rec.completed
    assert b"".join(c for _, c in received) == rec.sent_bytes  # identical bytes
    events = [c for _, c in rec.sent if c]
    assert len(events) == 7 and events[-1] == b"data: [DONE]\n\n"
    # Incremental: every event reached the client before the upstream sent the next one.
    for i in range(len(events) - 1):
        need = sum(len(e) for e in events[: i + 1])
        got, arrived = 0, None
        for t, c in received:
            got += len(c)
            if got >= need:
                arrived = t
                break
        assert arrived is not None and arrived < rec.sent[i + 1][0], f"event {i} was held back"


def test_client_disconnect_closes_upstream(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    with (
        httpx.Client(base_url=clients["allow"].base_url, timeout=30) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat(stream=True),
            headers={"x-upstream-chunks": "100", "x-upstream-chunk-delay": "0.05"},
        ) as r,
    ):
        it = r.iter_raw()
        next(it), next(it)
    assert upstream.wait_for(lambda: upstream.records and upstream.records[0].disconnected_at is not None, 5)
    assert not upstream.records[0].completed


def test_upstream_breaking_off_mid_stream_cuts_the_client_stream(
    clients: dict[str, httpx.Client], upstream: UpstreamServer
) -> None:
    got = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),  # not a clean end: the client can tell
        clients["allow"].stream(
            "POST", "/v1/chat/completions", json=chat(stream=True), headers={"x-upstream-break-after": "2"}
        ) as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_raw():
            got += chunk
    (rec,) = upstream.records
    assert got == rec.sent_bytes and b"[DONE]" not in got
    assert clients["allow"].get("/readyz").status_code == 200  # the service is fine


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_status_and_body_pass_through(
    clients: dict[str, httpx.Client], upstream: UpstreamServer, stream: bool
) -> None:
    r = post_json(clients["allow"], "/v1/chat/completions", chat(stream=stream), headers={"x-upstream-status": "429"})
    (rec,) = upstream.records
    assert r.status_code == 429 and r.content == rec.sent_bytes
    assert r.headers["retry-after"] == "7" and r.headers["x-upstream-marker"] == "kept"


def test_upstream_timeout_is_504(clients: dict[str, httpx.Client]) -> None:
    r = post_json(
        clients["allow"], "/v1/chat/completions", chat(), headers={"x-upstream-delay": str(UPSTREAM_TIMEOUT_S + 1)}
    )
    assert_error(r, 504, "upstream_timeout")


def test_upstream_down_is_502(clients: dict[str, httpx.Client]) -> None:
    err = assert_error(post_json(clients["down"], "/v1/chat/completions", chat()), 502, "upstream_error")
    assert err["details"]["reason"] == "ConnectError"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"messages": [', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "m"}', "messages"),
        (b'{"messages": [{"role": "user", "content": 7}]}', "content"),
        (b'{"messages": ["hi"]}', "role"),
    ],
)
def test_invalid_requests_are_refused_before_upstream(
    clients: dict[str, httpx.Client], upstream: UpstreamServer, raw: bytes, message: str
) -> None:
    err = assert_error(
        clients["allow"].post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    assert message in err["message"]
    assert upstream.records == []


# -- blocked: refusal, upstream never called ------------------------------------------------


def test_blocked_request_never_reaches_upstream(
    clients: dict[str, httpx.Client], upstream: UpstreamServer, srv: dict[str, Server]
) -> None:
    body = chat(f"tell me about {MARKER}", n=2)
    body["messages"].insert(0, {"role": "system", "content": "be nice"})
    r = post_json(clients["block"], "/v1/chat/completions", body, headers={"x-request-id": "blocked-1"})
    assert r.status_code == 200 and r.headers["x-uniguard-action"] == "blocked"
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "test-model" and out["id"].startswith("chatcmpl-")
    assert [c["finish_reason"] for c in out["choices"]] == ["content_filter", "content_filter"]
    assert out["choices"][0]["message"] == {"role": "assistant", "content": REFUSAL, "refusal": None}
    g = out["uniguard"]
    assert (
        g["action"] == "blocked" and g["stage"] == "input" and g["policies"] == ["toxicity"] and g["texts_checked"] == 1
    )
    assert [(v["index"], v["role"], v["policy_id"]) for v in g["violations"]] == [(1, "user", "toxicity")]
    assert upstream.records == []
    # The prompt never reaches the logs.
    log = srv["block"].log
    assert upstream.wait_for(lambda: "blocked-1" in log.read_text(), 5)
    assert MARKER not in log.read_text()
    (line,) = [json.loads(x) for x in log.read_text().splitlines() if "blocked-1" in x and x.startswith("{")]
    assert line["guard"] == "blocked" and line["status"] == 200 and line["prompt_chars"] > 0


def test_blocked_stream_is_an_sse_refusal(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    body["messages"][0]["content"] = [{"type": "text", "text": "some"}, {"type": "text", "text": "parts"}]
    r = post_json(clients["block"], "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": REFUSAL}
    assert chunks[1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 0
    assert chunks[0]["uniguard"]["violations"][0]["policy_id"] == "toxicity"
    assert upstream.records == []


def test_unguarded_roles_pass_and_output_moderation_blocks(
    clients: dict[str, httpx.Client], upstream: UpstreamServer
) -> None:
    operator = [{"role": "system", "content": "sys"}, {"role": "developer", "content": "d"}]  # not judged
    body = {"model": "test-model", "messages": operator}
    r = post_json(clients["block"], "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["x-uniguard-action"] == "blocked"
    out = r.json()
    assert len(upstream.records) == 1  # input had no judged message: forwarded
    assert out["uniguard"]["stage"] == "output" and out["choices"][0]["finish_reason"] == "content_filter"
    assert out["id"] == "chatcmpl-upstream-1" and out["usage"]["total_tokens"] == 8  # the upstream's, tokens were spent
    assert "echo" not in out
    # Streamed answers are relayed as they come: not moderated.
    r = post_json(clients["block"], "/v1/chat/completions", {**body, "stream": True})
    assert r.status_code == 200 and r.content == upstream.records[1].sent_bytes


# -- the model cannot score: fail-closed by default, fail-open when configured --------------


def test_fail_closed_when_model_not_ready(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    assert_error(post_json(clients["closed"], "/v1/chat/completions", chat()), 503, "not_ready")
    assert_error(post_json(clients["closed"], "/v1/chat/completions", chat(stream=True)), 503, "not_ready")
    assert_error(
        post_json(clients["closed"], "/beta/litellm_basic_guardrail_api", {"texts": ["hi"], "input_type": "request"}),
        503,
        "not_ready",
    )
    assert upstream.records == []


def test_fail_open_forwards_unguarded(clients: dict[str, httpx.Client], upstream: UpstreamServer) -> None:
    raw = json.dumps(chat("anything")).encode()
    r = clients["open"].post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.headers["x-uniguard-action"] == "unguarded"
    (rec,) = upstream.records
    assert rec.body == raw and r.content == rec.sent_bytes  # relayed after (unscored) output moderation
    assert r.headers["x-upstream-marker"] == "kept"
    lite = post_json(clients["open"], "/beta/litellm_basic_guardrail_api", {"texts": ["hi"], "input_type": "request"})
    assert lite.status_code == 200
    assert lite.json()["action"] == "NONE" and lite.json()["uniguard"]["action"] == "unguarded"


def test_sidecar_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    monkeypatch.setenv("UNIGUARD_GUARD_POLICIES", "toxicity, prompt_injection")
    monkeypatch.setenv("UNIGUARD_GUARD_ROLES", '["User", "system"]')
    monkeypatch.setenv("UNIGUARD_UPSTREAM_BASE_URL", "http://llm:4000/v1/")
    s = Settings()
    assert s.guard_policies == ["toxicity", "prompt_injection"] and s.guard_roles == ["user", "system"]
    assert s.upstream_base_url == "http://llm:4000/v1" and s.output_policies is None
    assert s.fail_open is False and s.moderate_output is False and s.api_key is None
    for key, bad in [
        ("UNIGUARD_UPSTREAM_BASE_URL", "llm:4000"),
        ("UNIGUARD_GUARD_POLICIES", ""),
        ("UNIGUARD_GUARD_POLICIES", "Not An Id"),
    ]:
        monkeypatch.setenv(key, bad)
        with pytest.raises(ValueError):
            Settings()
        monkeypatch.undo()
