"""Error codes, their statuses, and the one JSON shape every error answers with.

Each code maps to its status here and nowhere else, so clients can switch on ``error.code``
and a status never drifts from its meaning. Engine code raises ``ApiError`` with a code;
only ``service.http.errors`` turns it into an HTTP response. No web framework is imported
here: the engine and the batcher run without one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


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
