"""Bounded reads: a client gets ``header_timeout_s`` for its request head and ``body_timeout_s``
for its body, then the connection is cut.

uvicorn bounds only idle keep-alive connections (``timeout_keep_alive``, reset by every byte
received), so a client dripping one header byte every few seconds, or a body one byte at a
time, holds a socket and a request slot for ever. Two pieces close that:

* ``HeaderTimeoutProtocol`` (uvicorn's httptools protocol, which ``http="auto"`` picks: the
  service depends on httptools) starts a timer when a connection opens and when the first
  byte of each further request arrives, and stops it when the head is complete. On expiry a
  request that had begun gets 408 ``request_timeout``; a connection that never sent a byte is
  just closed. The idle time between keep-alive requests stays uvicorn's.
* ``BodyTimeoutMiddleware`` gives the app's reads of the body a deadline counted from the
  end of the head; past it the request gets 408 ``request_timeout`` with ``connection:
  close``. Reads after the body is complete (waiting for a disconnect while streaming an
  answer) are not bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.errors import ErrorCode, error_body
from service.http.errors import error_response
from service.http.middleware import OnError

log = logging.getLogger("uniguard.http")


def _raw_408(message: str) -> bytes:
    body = json.dumps(error_body(ErrorCode.request_timeout, message)).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request head (see the module doc)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._arm()  # no-op on a new connection: its timer runs since connection_made

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_started = False
        super().on_headers_complete()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._head_started and not answering:  # never interleave with a pipelined answer in flight
            log.info(
                "request head not received in time: connection closed",
                extra={"fields": {"header_timeout_s": self.header_timeout_s}},
            )
            self.transport.write(_raw_408(f"request head not received within {self.header_timeout_s:g} s"))
        self.transport.close()


def http_protocol(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with this head deadline."""

    class ConfiguredHeaderTimeoutProtocol(HeaderTimeoutProtocol):
        pass

    ConfiguredHeaderTimeoutProtocol.header_timeout_s = header_timeout_s
    return ConfiguredHeaderTimeoutProtocol


class _BodyTimedOut(Exception):
    pass


class BodyTimeoutMiddleware:
    """408 ``request_timeout`` (connection closed) when the body is not in within ``timeout_s``."""

    def __init__(self, app: ASGIApp, timeout_s: float, on_error: OnError | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                # asyncio's own: half the cost of anyio's cancel scope (uvicorn runs on asyncio only)
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimedOut from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _BodyTimedOut:
            if started:  # an answer is under way: nothing sane left to send
                raise
            if self.on_error is not None:
                self.on_error(ErrorCode.request_timeout)
            response = error_response(
                ErrorCode.request_timeout,
                f"request body not received within {self.timeout_s:g} s",
                {"body_timeout_s": self.timeout_s},
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
