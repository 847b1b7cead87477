"""FastAPI dependencies: routes get settings, engine and metrics from ``app.state.runtime``."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.runtime import LEASE_STATE_KEY, Runtime
from service.gateway.judge import EngineSource


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime  # set by create_app; Starlette's State is untyped
    return runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def get_metrics(request: Request) -> Metrics:
    return get_runtime(request).metrics


def get_engine(request: Request) -> Engine:
    """The engine this request uses, or 503 not_ready (loading, failed to load, or shutting down).

    The first call pins the serving engine to the request (``EngineLease``): later calls in
    the same request get the same engine even if a reload switched versions meanwhile.
    """
    lease = request.scope.get("state", {}).get(LEASE_STATE_KEY)
    return get_runtime(request).engine_for(lease)


async def _engine_dep(request: Request) -> Engine:
    # async: resolved on the event loop, no threadpool hop per request
    return get_engine(request)


async def _engine_source_dep(request: Request) -> EngineSource:
    # Not resolved yet: the gateway routes let service.gateway.judge decide what "no engine" means (fail-open).
    return partial(get_engine, request)


async def _runtime_dep(request: Request) -> Runtime:
    return get_runtime(request)  # async for the same reason: a sync dependency costs a thread hop


async def _settings_dep(request: Request) -> Settings:
    return get_settings(request)


async def _metrics_dep(request: Request) -> Metrics:
    return get_metrics(request)


RuntimeDep = Annotated[Runtime, Depends(_runtime_dep)]
SettingsDep = Annotated[Settings, Depends(_settings_dep)]
MetricsDep = Annotated[Metrics, Depends(_metrics_dep)]
EngineDep = Annotated[Engine, Depends(_engine_dep)]
EngineSourceDep = Annotated[EngineSource, Depends(_engine_source_dep)]


# Longest prompt excerpt put in an access log line when log_prompts is on.
LOGGED_PROMPT_CHARS = 10_000


def add_access_log_fields(request: Request, **fields: object) -> None:
    """Extra fields for this request's access-log line (see service.http.middleware)."""
    request.state.access_log = {**getattr(request.state, "access_log", {}), **fields}


def log_prompt(request: Request, settings: Settings, prompt: str) -> None:
    """Prompt text reaches the logs only when the operator turned log_prompts on."""
    fields: dict[str, object] = {"prompt_chars": len(prompt)}
    if settings.log_prompts:
        fields["prompt"] = prompt[:LOGGED_PROMPT_CHARS]
    add_access_log_fields(request, **fields)
