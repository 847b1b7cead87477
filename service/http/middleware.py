"""Pure-ASGI middleware: request ids + access logs + last-resort 500s, the body limit, and
the engine lease each request holds across a reload.

Pure ASGI (not BaseHTTPMiddleware) so the body limit sees the raw byte stream, chunked
bodies included, and nothing buffers responses.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import ErrorCode
from service.core.runtime import LEASE_STATE_KEY, EngineLease, Runtime
from service.http.errors import error_response

access_log = logging.getLogger("uniguard.access")
log = logging.getLogger("uniguard.errors")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Routes put extra access-log fields (policies, verdict, prompt if allowed) here.
ACCESS_LOG_STATE_KEY = "access_log"

OnError = Callable[[ErrorCode], None]


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())  # ASGI: raw (name, value) pairs
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (echoed in ``x-request-id``), logs one JSON access line,
    and turns an unhandled exception into a 500 in the error shape (traceback to the log only)."""

    def __init__(self, app: ASGIApp, on_error: OnError | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = incoming if incoming and _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id, "path": scope.get("path")}})
            if status:  # response already under way: nothing sane left to send
                raise
            if self.on_error is not None:
                self.on_error(ErrorCode.internal_error)
            response = error_response(ErrorCode.internal_error, "internal error", {"request_id": request_id})
            await response(scope, receive, send_with_id)
        finally:
            fields: dict[str, Any] = {
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1e3, 3),
                "request_id": request_id,
            }
            extra = state.get(ACCESS_LOG_STATE_KEY)
            if isinstance(extra, dict):
                fields.update(extra)
            access_log.info("request", extra={"fields": fields})


# Past the limit, up to this many bytes are still read and discarded so the client gets
# the 413 instead of a connection reset; beyond it the connection is simply dropped.
# 16 MiB: a 10 MB body (an image pasted into a chat) still gets a readable 413.
DRAIN_LIMIT_BYTES = 16 << 20


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 body_too_large.

    Checks Content-Length up front and counts the bytes actually received (a chunked body
    has no Content-Length), buffering at most ``max_bytes`` before the app runs.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: OnError | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            expect_continue = (_header(scope, b"expect") or "").lower() == "100-continue"
            if not expect_continue and int(declared) <= DRAIN_LIMIT_BYTES:
                await self._drain(receive, 0)
            await self._reject(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # client gone; nothing to answer
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                if message.get("more_body", False):
                    total = await self._drain(receive, total)
                await self._reject(scope, receive, send, total)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    @staticmethod
    async def _drain(receive: Receive, total: int) -> int:
        while total <= DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return total

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        if self.on_error is not None:
            self.on_error(ErrorCode.body_too_large)
        response = error_response(
            ErrorCode.body_too_large,
            f"request body exceeds {self.max_bytes} bytes",
            {"max_bytes": self.max_bytes, "received_bytes_at_least": size},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# Body types a JSON-only API reads as JSON: `curl -d` sends form-urlencoded by default, and
# many gateway hooks send text/plain or nothing; refusing them would only break clients.
_JSON_LIKE = (b"", b"application/x-www-form-urlencoded", b"text/plain")


class JsonBodyMiddleware:
    """Treats POST bodies without a JSON content type as JSON (the API speaks nothing else), and
    refuses content-encoded bodies: the guard would judge bytes it cannot read while the
    upstream, which may decode them, reads something else."""

    def __init__(self, app: ASGIApp, on_error: OnError | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            encoding = (_header(scope, b"content-encoding") or "identity").strip().lower()
            if encoding != "identity":
                if self.on_error is not None:
                    self.on_error(ErrorCode.invalid_request)
                response = error_response(
                    ErrorCode.invalid_request,
                    "request bodies must be sent uncompressed (no Content-Encoding): the guard reads the body as sent",
                    [{"loc": ["header", "content-encoding"], "type": "content_encoding", "msg": encoding[:100]}],
                )
                await response(scope, receive, send)
                return
            headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-type"]
            declared = _header(scope, b"content-type")
            kind = (declared or "").split(";")[0].strip().lower().encode("latin-1")
            if kind in _JSON_LIKE:
                scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class EngineLeaseMiddleware:
    """Gives each HTTP request an ``EngineLease`` (released when the request ends, streamed
    responses included), so the engine it first used stays alive and keeps answering it
    across a reload. Innermost: only requests that passed auth and the body limit hold one."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lease = EngineLease(self.runtime)
        scope.setdefault("state", {})[LEASE_STATE_KEY] = lease
        try:
            await self.app(scope, receive, send)
        finally:
            lease.release()
