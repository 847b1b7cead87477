"""The fake OpenAI-compatible upstream of every test, on a loopback port in a thread.

Raw ASGI (no framework), so it records exactly the bytes and headers it received and
sends exactly the chunks it means to. Each request is scripted by its own headers, which
the guard proxy forwards like any other:

    x-upstream-status: 429        answer this status with an OpenAI error body
    x-upstream-delay: 3           wait this long before answering (timeouts)
    x-upstream-chunks: 5          for "stream": true, this many content chunks ...
    x-upstream-chunk-delay: 0.2   ... this far apart
    x-upstream-answer: text       the assistant content (default: "echo: <last message>"); streamed
                                  word by word ("Hello", " world", ...) instead of tok0 tok1 ...
    x-upstream-break-after: 2     stream this many events, then drop the connection mid-body

Non-streamed answers are a ``chat.completion`` with an extra ``echo`` field holding the
received body (``UpstreamServer(stream_echo=True)`` streams the same "echo: ..." answer word
by word, for clients such as a gateway that do not forward the scripting headers); streams
are ``chat.completion.chunk`` SSE events ending in ``data: [DONE]``.
``records`` holds every request: method, path, headers, raw body, arrival time, the chunks
sent with their send times, and whether the client disconnected before the end.

``UpstreamServer(responder=...)`` scripts each chat completion in code instead (the SDG
backend's tests): ``responder(request_body, index)`` returns a ``Reply`` (content, status, raw
body, headers, delay), so a test can send good JSON, malformed answers, 429 with Retry-After,
5xx, or a reply slower than the client's timeout. ``requests`` and ``arrivals`` are then the
parsed bodies and arrival times of the chat completion requests, ``kinds()`` which SDG call
each one was.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class Record:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    sent: list[tuple[float, bytes]] = field(default_factory=list)  # (time.monotonic(), chunk)
    completed: bool = False
    disconnected_at: float | None = None
    arrived: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None

    @property
    def sent_bytes(self) -> bytes:
        return b"".join(chunk for _, chunk in self.sent)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class UpstreamBroke(Exception):
    pass


@dataclass
class Reply:
    """A responder's answer to one chat completion request."""

    content: str | None = None  # the assistant message text
    status: int = 200
    body: str | None = None  # raw body instead of a chat completion
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Responder = Callable[[dict[str, Any], int], Reply]


def kind_of(request: dict[str, Any]) -> str:
    """Which SDG call a request is: generate, paraphrase, review or refine."""
    system = request["messages"][0]["content"]
    if "You rewrite messages" in system:
        return "paraphrase"
    if "reviewer" in system:
        return "review"
    if "clear content policies" in system:
        return "refine"
    return "generate"


def completion(content: str, model: str = "scripted") -> str:
    return json.dumps(
        {
            "id": "cmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }
    )


class UpstreamServer:
    def __init__(self, responder: Responder | None = None, *, stream_echo: bool = False) -> None:
        self.responder = responder
        self.stream_echo = stream_echo
        self.records: list[Record] = []
        self.requests: list[dict[str, Any]] = []  # responder mode: the chat completion bodies
        self.arrivals: list[float] = []  # ... and when each arrived
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (version included), as UNIGUARD_UPSTREAM_BASE_URL expects."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> UpstreamServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, interface="asgi3", lifespan="off", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("upstream server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear(self) -> None:
        self.records.clear()

    def kinds(self) -> list[str]:
        return [kind_of(r) for r in self.requests]

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    # -- the ASGI app ------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        record = Record(scope["method"], scope["path"], headers, body)
        self.records.append(record)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            record.disconnected_at = time.monotonic()

        watcher = asyncio.create_task(watch())
        try:
            await self._answer(record, send)
        finally:
            watcher.cancel()

    async def _answer(self, record: Record, send: Any) -> None:
        async def emit(chunk: bytes, more: bool = True) -> None:
            record.sent.append((time.monotonic(), chunk))
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

        if self.responder is not None:
            await self._reply(record, send, emit)
            return

        await asyncio.sleep(float(record.header("x-upstream-delay") or 0))
        status = int(record.header("x-upstream-status") or 200)
        try:
            request = json.loads(record.body)
        except ValueError:
            request = {}
        if status != 200:
            payload = json.dumps(
                {"error": {"message": "scripted upstream failure", "type": "invalid_request_error", "code": status}}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"retry-after", b"7"),
                        (b"x-upstream-marker", b"kept"),
                    ],
                }
            )
            await emit(payload, more=False)
            record.completed = True
            return
        messages = request.get("messages") or [{}]
        last = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        answer = record.header("x-upstream-answer") or f"echo: {last if isinstance(last, str) else ''}"
        common = {"id": "chatcmpl-upstream-1", "created": 1700000000, "model": request.get("model", "test-model")}
        if request.get("stream") is True:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                        (b"x-upstream-marker", b"kept"),
                    ],
                }
            )
            n = int(record.header("x-upstream-chunks") or 3)
            delay = float(record.header("x-upstream-chunk-delay") or 0)
            break_after = int(record.header("x-upstream-break-after") or -1)
            chunk = {**common, "object": "chat.completion.chunk"}
            events = [
                sse(
                    {
                        **chunk,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                )
            ]
            scripted = record.header("x-upstream-answer") or (answer if self.stream_echo else None)
            pieces = re.findall(r"\s*\S+", scripted) if scripted else [f"tok{i} " for i in range(n)]
            events += [
                sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                for piece in pieces
            ]
            events += [
                sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                b"data: [DONE]\n\n",
            ]
            for i, event in enumerate(events):
                if record.disconnected_at is not None:
                    return
                if i and delay:
                    await asyncio.sleep(delay)
                if i == break_after:
                    raise UpstreamBroke("scripted: connection dropped mid-stream")  # uvicorn closes the connection
                await emit(event)
            await emit(b"", more=False)
            record.completed = True
            return
        payload = json.dumps(
            {
                **common,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                "echo": request,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-upstream-marker", b"kept"),
                ],
            }
        )
        await emit(payload, more=False)
        record.completed = True

    async def _reply(self, record: Record, send: Any, emit: Callable[..., Any]) -> None:
        """Responder mode: the reply the responder scripts for this request."""
        assert self.responder is not None
        if record.method != "POST" or record.path != "/v1/chat/completions":
            reply = Reply(status=404, body='{"error": "not found"}')
        else:
            request = json.loads(record.body)
            index = len(self.requests)
            self.requests.append(request)
            self.arrivals.append(record.arrived)
            reply = self.responder(request, index)
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        data = (reply.body if reply.body is not None else completion(reply.content or "")).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await emit(data, more=False)
        record.completed = True
