"""service.guard without HTTP: the engine and metrics are arguments, not pulled from a request."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.guard import GuardText, judge
from service.metrics import Metrics

ROUTE = "/beta/litellm_basic_guardrail_api"


def _no_engine() -> Engine:
    raise ApiError(ErrorCode.not_ready, "model is loading")


def _gateway_count(metrics: Metrics, action: str) -> float | None:
    return metrics.registry.get_sample_value("uniguard_gateway_judgements_total", {"route": ROUTE, "action": action})


def test_no_engine_fails_open_and_is_counted_under_the_route() -> None:
    metrics = Metrics()
    judgement = asyncio.run(
        judge(_no_engine, metrics, [GuardText(0, "hi")], ["toxicity"], route=ROUTE, from_config=True, fail_open=True)
    )
    assert judgement.outcome == "unguarded" and judgement.unguarded == "not_ready"
    assert _gateway_count(metrics, "unguarded") == 1.0


def test_no_engine_fails_closed_by_default() -> None:
    metrics = Metrics()
    with pytest.raises(ApiError) as info:
        asyncio.run(
            judge(
                _no_engine, metrics, [GuardText(0, "hi")], ["toxicity"], route=ROUTE, from_config=True, fail_open=False
            )
        )
    assert info.value.code is ErrorCode.not_ready
    assert _gateway_count(metrics, "unguarded") is None
