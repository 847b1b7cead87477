"""Small promises: no upstream is an answer SDKs do not retry, every labelled metric series
exists from start, the health probes answer HEAD. The real service over HTTP, the real
OpenAI SDK."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2  # what openai 3.x is built on
import openai
import pytest

from service.core.errors import REJECTION_CODES, ErrorCode
from tests.harness.live_server import Server, serve

ROUTES = ("/beta/litellm_basic_guardrail_api", "/v1/chat/completions")
GATEWAY_ACTIONS = ("allowed", "blocked", "unguarded")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("small") / "server.log"
    with serve(log, UNIGUARD_MODEL_DIR=str(tiny_model_dir)) as s:  # no UNIGUARD_UPSTREAM_BASE_URL
        s.wait("/readyz", 200)
        yield s


def test_no_upstream_is_404_that_the_openai_sdk_does_not_retry(server: Server) -> None:
    sent: list[httpx2.Request] = []
    with httpx2.Client(event_hooks={"request": [sent.append]}) as http:  # the SDK's own HTTP client type
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", http_client=http, max_retries=2)
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert len(sent) == 1  # was 3 with 501: the SDK retries every 5xx twice
    response = info.value.response
    assert response.status_code == 404 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "upstream_not_configured"
    assert "OpenAI-compatible proxy off" in server.log.read_text()  # said once, at start-up


def _series(text: str, name: str) -> dict[str, float]:
    """label text -> value for every sample of one metric name."""
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def test_every_labelled_series_exists_at_zero_from_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serve(tmp_path / "fresh.log", UNIGUARD_MODEL_DIR=str(tiny_model_dir)) as s:
        s.wait("/healthz", 200)
        text = httpx.get(s.url + "/metrics").text  # the first request this server answers
    rejected = _series(text, "uniguard_rejected_total")
    assert rejected == {f'reason="{code.value}"': 0.0 for code in REJECTION_CODES}
    errors = _series(text, "uniguard_errors_total")
    assert errors == {f'code="{code.value}"': 0.0 for code in ErrorCode}
    assert _series(text, "uniguard_reloads_total") == {'outcome="ok"': 0.0, 'outcome="failed"': 0.0}
    gateway = _series(text, "uniguard_gateway_judgements_total")
    assert gateway == {f'action="{a}",route="{r}"': 0.0 for r in ROUTES for a in GATEWAY_ACTIONS}


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_probes_answer_head(server: Server, path: str) -> None:
    get = httpx.get(server.url + path)
    head = httpx.head(server.url + path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == "application/json"
