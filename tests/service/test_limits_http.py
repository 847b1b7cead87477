"""Fair scheduling and the admission budget over real HTTP (``python -m service`` under
uvicorn, tiny model): a short request is answered while a maximal prompt is being scored,
and a prompt that cannot be scored before its deadline is refused at once with 413."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.contract.policy import Policy
from service.model.onnx_model import OnnxModel
from tests.harness.live_server import Server, assert_error, metric, serve

LONG_POLICIES = ["content_safety", "financial_advice", "prompt_injection", "tax_advice", "toxicity"]


@pytest.fixture(scope="module")
def fair_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Room for five policies x 100,000 characters (~2,300 windows, about a second of the tiny
    # model); no budget and a long deadline, so only the scheduling decides the order.
    log = tmp_path_factory.mktemp("fair") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_MAX_QUEUE="8000",
        UNIGUARD_WINDOW_BUDGET_FACTOR="0",
        UNIGUARD_REQUEST_TIMEOUT_S="120",
    ) as s:
        s.wait("/readyz", 200)
        yield s


def test_short_request_is_answered_while_a_maximal_prompt_is_scored(fair_server: Server) -> None:
    prompt = ("Please summarise the following report in detail. " * 2100)[:100_000]
    long: dict[str, httpx.Response] = {}

    def send_long() -> None:
        long["r"] = httpx.post(
            fair_server.url + "/v1/classify", json={"policy_id": LONG_POLICIES, "prompt": prompt}, timeout=120
        )

    t = threading.Thread(target=send_long)
    t.start()
    deadline = time.monotonic() + 60
    while metric(httpx.get(fair_server.url + "/metrics").text, "uniguard_queue_depth") == 0:  # tokenised and queued
        assert time.monotonic() < deadline and t.is_alive(), "the long prompt never reached the queue"
        time.sleep(0.005)
    r = httpx.post(fair_server.url + "/v1/classify", json={"policy_id": "toxicity", "prompt": "hi"}, timeout=120)
    still_running = t.is_alive()
    assert r.status_code == 200, r.text
    assert r.json()["windows"] == 1
    assert still_running, "the short request waited for the whole long prompt"
    t.join()
    assert long["r"].status_code == 200, long["r"].text
    windows = [v["windows"] for v in long["r"].json()["results"]]
    assert sum(windows) > 2000


@pytest.fixture(scope="module")
def budget_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A factor this small leaves the floor (4 windows) as the whole budget, whatever the CPU.
    log = tmp_path_factory.mktemp("budget") / "server.log"
    with serve(
        log,
        UNIGUARD_MODEL_DIR=str(tiny_model_dir),
        UNIGUARD_WINDOW_BUDGET_FACTOR="1e-12",
        UNIGUARD_MIN_WINDOW_BUDGET="4",
    ) as s:
        s.wait("/readyz", 200)
        yield s


def prompt_with_windows(model: OnnxModel, policy: Policy, windows: int) -> str:
    text = "alpha"
    while model.encoder.encode(policy, text).count < windows:
        text += " alpha beta gamma delta"
    assert model.encoder.encode(policy, text).count == windows
    return text


def test_over_budget_prompt_is_413_at_once_within_budget_is_scored(
    budget_server: Server, tiny_model: OnnxModel, shipped_policies: dict[str, Policy]
) -> None:
    policy = shipped_policies["toxicity"]
    url = budget_server.url + "/v1/classify"
    before = httpx.get(budget_server.url + "/metrics").text
    r = httpx.post(
        url, json={"policy_id": "toxicity", "prompt": prompt_with_windows(tiny_model, policy, 4)}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["windows"] == 4
    r = httpx.post(url, json={"policy_id": "toxicity", "prompt": "x " * 20_000}, timeout=30)
    err = assert_error(r, 413, "prompt_too_long")
    details = err["details"]
    assert details["limit"] == "window_budget" and details["budget"] == 4 and details["windows"] > 4
    assert {"tokens", "budget_tokens", "throughput_tokens_per_s", "deadline_s"} <= details.keys()
    assert "deadline" in err["message"]
    after = httpx.get(budget_server.url + "/metrics").text
    name = 'uniguard_rejected_total{reason="prompt_too_long"}'
    assert metric(after, name) - (metric(before, name) if name in before else 0) == 1
    assert metric(after, "uniguard_model_throughput_tokens_per_second") > 0
    assert metric(after, 'uniguard_errors_total{code="deadline_exceeded"}') == 0  # refused, not timed out
