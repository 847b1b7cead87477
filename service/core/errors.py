"""Error codes, their HTTP statuses, and the one JSON shape every error answers with.

Each code maps to its status here and nowhere else, so clients can switch on ``error.code``
and a status never drifts from its meaning. Engine code raises ``ApiError`` with a code;
only this module turns it into HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("uniguard.errors")


class ErrorCode(StrEnum):
    unknown_policy = "unknown_policy"
    invalid_request = "invalid_request"
    empty_prompt = "empty_prompt"
    policy_too_long = "policy_too_long"
    too_many_policies = "too_many_policies"
    too_many_texts = "too_many_texts"
    prompt_too_long = "prompt_too_long"
    body_too_large = "body_too_large"
    request_timeout = "request_timeout"  # the client did not send its request head or body in time
    queue_full = "queue_full"
    not_ready = "not_ready"
    deadline_exceeded = "deadline_exceeded"
    internal_error = "internal_error"
    # Gateway sidecar: API key auth and the upstream LLM behind the OpenAI-compatible proxy.
    unauthorized = "unauthorized"
    upstream_error = "upstream_error"
    upstream_timeout = "upstream_timeout"
    upstream_not_configured = "upstream_not_configured"
    # Routing errors from Starlette (no such path / method), kept in the same shape.
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    # Operations: admin endpoints.
    forbidden = "forbidden"
    reload_failed = "reload_failed"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.unknown_policy: 404,
    ErrorCode.invalid_request: 422,
    ErrorCode.empty_prompt: 422,
    ErrorCode.policy_too_long: 422,
    ErrorCode.too_many_policies: 422,
    ErrorCode.too_many_texts: 413,
    ErrorCode.prompt_too_long: 413,
    ErrorCode.body_too_large: 413,
    ErrorCode.request_timeout: 408,
    ErrorCode.queue_full: 429,
    ErrorCode.not_ready: 503,
    ErrorCode.deadline_exceeded: 504,
    ErrorCode.internal_error: 500,
    ErrorCode.unauthorized: 401,
    ErrorCode.upstream_error: 502,
    ErrorCode.upstream_timeout: 504,
    # 404, not 501: SDKs retry every 5xx (the OpenAI SDK twice), and retrying cannot help.
    ErrorCode.upstream_not_configured: 404,
    ErrorCode.not_found: 404,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.forbidden: 403,
    ErrorCode.reload_failed: 422,
}

# Load shedding / admission refusals: counted as rejections as well as errors.
REJECTION_CODES = frozenset(
    {
        ErrorCode.queue_full,
        ErrorCode.body_too_large,
        ErrorCode.prompt_too_long,
        ErrorCode.too_many_texts,
        ErrorCode.not_ready,
        ErrorCode.deadline_exceeded,
    }
)

# Seconds a client should wait after 429 queue_full.
RETRY_AFTER_S = 1
# Answers no retry can change: the OpenAI SDKs (and Stainless-made ones) honour this header.
NO_RETRY = frozenset({ErrorCode.upstream_not_configured})
SHOULD_RETRY_HEADER = "x-should-retry"


class ApiError(Exception):
    """A request failure with a stable code; ``details`` must be JSON-safe and small."""

    def __init__(
        self, code: ErrorCode, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
        if code is ErrorCode.queue_full:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        if code in NO_RETRY:
            self.headers.setdefault(SHOULD_RETRY_HEADER, "false")

    @property
    def status(self) -> int:
        return self.code.status


def error_body(code: ErrorCode, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code.value, "message": message, "details": details}}


def error_response(
    code: ErrorCode, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=code.status, headers=headers)


MAX_VALIDATION_ERRORS = 20
MAX_MSG_CHARS = 300


def summarize_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """pydantic errors without their ``input`` (which may be a megabyte prompt), capped."""
    out: list[dict[str, Any]] = []
    for err in list(errors)[:MAX_VALIDATION_ERRORS]:
        item: dict[str, Any] = {
            "loc": [p if isinstance(p, (str, int)) else str(p) for p in err.get("loc", ())],
            "type": str(err.get("type", "")),
            "msg": str(err.get("msg", ""))[:MAX_MSG_CHARS],
        }
        ctx_error = (err.get("ctx") or {}).get("error")
        if err.get("type") == "json_invalid" and ctx_error:
            item["msg"] = f"{item['msg']}: {str(ctx_error)[:MAX_MSG_CHARS]}"
        out.append(item)
    return out


def install_error_handlers(app: FastAPI, on_error: Callable[[ErrorCode], None] | None = None) -> None:
    """Route every handled failure into the error shape; ``on_error`` counts them (metrics).

    Unhandled exceptions are answered by the request-context middleware (so the 500 still
    carries a request id); see ``service.http.middleware``.
    """

    def _count(code: ErrorCode) -> None:
        if on_error is not None:
            on_error(code)

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        _count(exc.code)
        return error_response(exc.code, exc.message, exc.details, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        _count(ErrorCode.invalid_request)
        details = summarize_validation_errors(exc.errors())
        message = "request does not match the schema"
        if any(d["type"] == "json_invalid" for d in details):
            message = "request body is not valid JSON"
        elif "json" not in request.headers.get("content-type", "json"):
            message = "request body must be JSON sent with Content-Type: application/json"
        return error_response(ErrorCode.invalid_request, message, details)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's answer to a body json.loads cannot even start on (bytes that are not
            # UTF-8, nesting deeper than the parser's recursion limit): same code and status
            # as any other unreadable JSON.
            _count(ErrorCode.invalid_request)
            return error_response(
                ErrorCode.invalid_request,
                "request body is not valid JSON (it must be UTF-8 and nested at most a few hundred levels deep)",
                [{"loc": ["body"], "type": "json_invalid", "msg": str(exc.detail)[:MAX_MSG_CHARS]}],
            )
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(exc.status_code)
        if code is None:
            code = ErrorCode.invalid_request if 400 <= exc.status_code < 500 else ErrorCode.internal_error
        _count(code)
        body = error_body(code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
