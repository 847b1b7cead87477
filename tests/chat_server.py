"""A scripted OpenAI-compatible chat-completions server on a loopback port, for SDG tests.

Real HTTP (httpx talks to a socket, headers and status codes are real), no model: a
``responder`` decides each reply from the request body and its arrival index, so tests
can script good JSON, malformed answers, 429 with Retry-After, 5xx, or a reply slower
than the client's timeout.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
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


class ScriptedChatServer:
    """``with ScriptedChatServer(responder) as srv: OpenAIChatBackend(srv.base_url, ...)``."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/chat/completions":
                    self._send(Reply(status=404, body='{"error": "not found"}'))
                    return
                request = json.loads(body)
                with server._lock:
                    index = len(server.requests)
                    server.requests.append(request)
                    server.arrivals.append(time.monotonic())
                reply = server.responder(request, index)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                data = (reply.body if reply.body is not None else completion(reply.content or "")).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def kinds(self) -> list[str]:
        return [kind_of(r) for r in self.requests]

    def __enter__(self) -> ScriptedChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
