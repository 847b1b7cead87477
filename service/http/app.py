"""App factory: ``create_app(settings)`` wires runtime, routes, errors and middleware.

No globals: each call builds an independent app with its own metrics registry, so tests
(and a future sidecar) can run several in one process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.config import Settings
from service.core.errors import REJECTION_CODES, ErrorCode
from service.core.runtime import Runtime
from service.gateway.upstream import Upstream
from service.http.auth import ApiKeyMiddleware, open_paths
from service.http.errors import install_error_handlers
from service.http.middleware import (
    BodyLimitMiddleware,
    EngineLeaseMiddleware,
    JsonBodyMiddleware,
    RequestContextMiddleware,
)
from service.http.openapi import install_openapi
from service.http.read_timeouts import BodyTimeoutMiddleware
from service.http.routes import admin, classify, health, litellm, metrics, moderations, openai_proxy, policies

log = logging.getLogger("uniguard.main")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings)
    upstream = Upstream(settings)  # pooled client for the OpenAI-compatible proxy

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers at once, /readyz turns 200 when warm.
        runtime.start_loading()
        if not upstream.configured:
            log.info(
                "OpenAI-compatible proxy off: UNIGUARD_UPSTREAM_BASE_URL is not set; the route answers 404 "
                "upstream_not_configured with x-should-retry: false",
                extra={"fields": {"path": openai_proxy.PATH}},
            )
        try:
            yield
        finally:
            try:
                await runtime.shutdown()
            finally:
                await upstream.aclose()

    app = FastAPI(
        title="UniGuard",
        version="0.1.0",
        summary="Judge whether a prompt violates a written policy.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.upstream = upstream
    install_error_handlers(app, runtime.record_error)
    runtime.metrics.init_series(
        [code.value for code in ErrorCode],
        sorted(code.value for code in REJECTION_CODES),
        [litellm.PATH, openai_proxy.PATH],
    )
    for module in (classify, moderations, policies, health, metrics, litellm, openai_proxy, admin):
        app.include_router(module.router)
    install_openapi(app, settings)
    # Last added is outermost: request ids and access logs wrap the body limit, so a 413 has an id.
    # Innermost: a request pins the engine it first uses until it ends (hot reload, see runtime).
    app.add_middleware(EngineLeaseMiddleware, runtime=runtime)
    app.add_middleware(JsonBodyMiddleware, on_error=runtime.record_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_error=runtime.record_error)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s, on_error=runtime.record_error)
    if settings.api_key is not None:  # inside the request context (401s logged), outside the body limit (never read)
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            open_paths=open_paths(settings.metrics_public),
            on_error=runtime.record_error,
        )
    app.add_middleware(RequestContextMiddleware, on_error=runtime.record_error)
    return app
