"""Optional API key: every route but the health probes needs the key when one is configured.

Pure ASGI, installed inside the request-context middleware (a 401 has a request id and an
access-log line) and outside the body limit (an unauthenticated body is never read). Being
middleware rather than a route dependency, it also covers /docs, /openapi.json, unknown
paths and every route added later: nothing is open unless listed here.

The key is accepted as ``Authorization: Bearer <key>`` (OpenAI clients, curl) or as
``x-api-key: <key>`` (what LiteLLM's generic guardrail sends for ``api_key:``). Comparison
is constant-time over SHA-256 digests, so neither content nor length leaks through timing.
/metrics needs the key too unless ``metrics_public`` (Prometheus can send a bearer token:
``authorization: {credentials: <key>}`` in the scrape config).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import ErrorCode
from service.http.errors import error_response

# Always open: orchestrator probes carry no credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
# The headers that carried the key ("authorization", "x-api-key"), in scope["state"], so the
# proxy never forwards the UniGuard key upstream.
AUTH_HEADER_STATE_KEY = "auth_headers"

OnError = Callable[[ErrorCode], None]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class ApiKeyMiddleware:
    """401 ``unauthorized`` (with ``WWW-Authenticate: Bearer``) unless the request has the key."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS, on_error: OnError | None = None
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self.open_paths = frozenset(open_paths)
        self.on_error = on_error
        self._key_digest = _digest(api_key)

    def _matches(self, presented: str) -> bool:
        return hmac.compare_digest(_digest(presented), self._key_digest)

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """Names of the headers that carried the right key (empty: not authenticated)."""
        found = []
        for raw_name, raw_value in headers:
            name = raw_name.lower()
            value = raw_value.decode("latin-1").strip()
            if name == b"authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and self._matches(token.strip()):
                    found.append("authorization")
            elif name == b"x-api-key" and self._matches(value):
                found.append("x-api-key")
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        carried = self.authenticate(scope.get("headers", ()))
        if not carried:
            if self.on_error is not None:
                self.on_error(ErrorCode.unauthorized)
            response = error_response(
                ErrorCode.unauthorized,
                "missing or invalid API key",
                {"accepted": ["Authorization: Bearer <key>", "x-api-key: <key>"]},
                headers={"WWW-Authenticate": 'Bearer realm="uniguard"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[AUTH_HEADER_STATE_KEY] = carried
        await self.app(scope, receive, send)


def open_paths(metrics_public: bool) -> frozenset[str]:
    return OPEN_PATHS | {METRICS_PATH} if metrics_public else OPEN_PATHS
