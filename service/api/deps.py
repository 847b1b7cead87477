"""FastAPI dependencies: routes get settings, engine and metrics from ``app.state.runtime``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.engine import Engine
from service.errors import ApiError, ErrorCode
from service.metrics import Metrics
from service.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def get_metrics(request: Request) -> Metrics:
    return get_runtime(request).metrics


def get_engine(request: Request) -> Engine:
    """The engine, or 503 not_ready (loading, failed to load, or shutting down)."""
    runtime = get_runtime(request)
    if not runtime.ready or runtime.engine is None:
        raise ApiError(ErrorCode.not_ready, runtime.not_ready_reason or "not ready")
    return runtime.engine


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]


# Longest prompt excerpt put in an access log line when log_prompts is on.
LOGGED_PROMPT_CHARS = 10_000


def add_access_log_fields(request: Request, **fields: object) -> None:
    """Extra fields for this request's access-log line (see service.middleware)."""
    request.state.access_log = {**getattr(request.state, "access_log", {}), **fields}


def log_prompt(request: Request, settings: Settings, prompt: str) -> None:
    """Prompt text reaches the logs only when the operator turned log_prompts on."""
    fields: dict[str, object] = {"prompt_chars": len(prompt)}
    if settings.log_prompts:
        fields["prompt"] = prompt[:LOGGED_PROMPT_CHARS]
    add_access_log_fields(request, **fields)
