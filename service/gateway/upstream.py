"""The LLM behind the OpenAI-compatible proxy: one pooled ``httpx.AsyncClient`` per app.

Forwarding is transparent: the request body goes out byte for byte, headers go out as the
client sent them except hop-by-hop ones (RFC 9110 §7.6.1, including any the client listed
in ``Connection``), ``Host``/``Content-Length`` (recomputed) and the UniGuard API key. The
answer comes back with the upstream's status, headers (less hop-by-hop, ``Date``,
``Server``) and raw body bytes, relayed chunk by chunk as they arrive (SSE included), and
the upstream connection is closed as soon as the client goes away.

The client is built without httpx's default headers, so nothing the caller did not send
(``Accept-Encoding: gzip``, ``User-Agent: python-httpx``) is added on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.config import Settings
from service.core.errors import ApiError, ErrorCode

log = logging.getLogger("uniguard.upstream")
# httpx logs every request URL at INFO: the access log already has one line per request.
logging.getLogger("httpx").setLevel(logging.WARNING)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}
# A dead upstream should fail fast even when reads may legitimately take a minute.
MAX_CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_EXPIRY_S = 30.0
MAX_ERROR_DETAIL_CHARS = 300

Headers = list[tuple[str, str]]


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names a ``Connection`` header marks as hop-by-hop."""
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return listed


def forward_headers(
    raw: Iterable[tuple[bytes, bytes]], *, drop: Iterable[str] = (), api_key: str | None = None
) -> Headers:
    """Client request headers to send upstream, in order, duplicates kept."""
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
    dropped = _REQUEST_DROP | _connection_listed(pairs) | {d.lower() for d in drop}
    if api_key is not None:
        dropped |= {"authorization"}
    out = [(k, v) for k, v in pairs if k.lower() not in dropped]
    if api_key is not None:
        out.append(("authorization", f"Bearer {api_key}"))
    return out


def response_headers(resp: httpx.Response, *, drop: Iterable[str] = ()) -> list[tuple[bytes, bytes]]:
    """Upstream response headers to relay to the client, as raw ASGI pairs."""
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.raw]
    dropped = _RESPONSE_DROP | _connection_listed(pairs) | {d.lower() for d in drop}
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs if k.lower() not in dropped]


class Upstream:
    """Sends requests to ``upstream_base_url`` over one connection pool."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.upstream_base_url
        self.api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        t = settings.upstream_timeout_s
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(t, connect=min(t, MAX_CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            follow_redirects=False,
        )
        for name in list(self.client.headers):  # Accept, Accept-Encoding, Connection, User-Agent
            del self.client.headers[name]

    @property
    def configured(self) -> bool:
        return self.base_url is not None

    def require_configured(self) -> None:
        if self.base_url is None:
            raise ApiError(
                ErrorCode.upstream_not_configured, "this server has no upstream LLM; set UNIGUARD_UPSTREAM_BASE_URL"
            )

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> httpx.Response:
        """The upstream response with its body not yet read (close it, or relay it with ProxiedResponse).

        Raises ApiError upstream_timeout (504) or upstream_error (502) when no answer comes.
        """
        self.require_configured()
        request = self.client.build_request(method, f"{self.base_url}{path}", headers=headers, content=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise ApiError(
                ErrorCode.upstream_timeout, "the upstream LLM did not answer in time", _exc_details(exc)
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiError(
                ErrorCode.upstream_error, "the upstream LLM could not be reached", _exc_details(exc)
            ) from exc

    async def read(self, resp: httpx.Response) -> bytes:
        """The whole (decoded) body of a response from ``send``; the response is closed."""
        try:
            return await resp.aread()
        except httpx.TimeoutException as exc:
            raise ApiError(
                ErrorCode.upstream_timeout, "the upstream LLM did not finish its answer in time", _exc_details(exc)
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiError(
                ErrorCode.upstream_error, "the upstream LLM broke off its answer", _exc_details(exc)
            ) from exc
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def _exc_details(exc: Exception) -> dict[str, str]:
    # The exception text, never the URL (it may carry credentials).
    return {"reason": type(exc).__name__, "message": str(exc)[:MAX_ERROR_DETAIL_CHARS]}


async def relay_until_disconnect(
    upstream: httpx.Response,
    receive: Receive,
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: Callable[[], Awaitable[None]],
    what: str,
) -> bool:
    """Send the head, run ``body`` (which sends the chunks), then the final empty chunk; stop as
    soon as the client disconnects (a concurrent ``receive``, so a silent upstream is noticed
    too) and always close the upstream. True when the response went out whole."""
    complete = False
    try:
        async with anyio.create_task_group() as tg:

            async def relay() -> None:
                nonlocal complete
                try:
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await body()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    complete = True
                except OSError:  # the client went away while we were sending
                    pass
                except httpx.HTTPError as exc:
                    log.warning(f"upstream broke off {what}", extra={"fields": _exc_details(exc)})
                tg.cancel_scope.cancel()

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(relay)
            tg.start_soon(watch_disconnect)
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
    return complete


class ProxiedResponse(Response):
    """Relays an upstream response unchanged: status, headers, raw body chunks as they come.

    Stops and closes the upstream connection when the client disconnects (watched with a
    concurrent ``receive``, so a silent upstream is noticed too). An upstream failure after
    the headers went out cannot change the status: the stream is cut short (no final chunk),
    which clients read as a broken response rather than a complete one.
    """

    def __init__(self, upstream: httpx.Response, extra_headers: Iterable[tuple[str, str]] = ()) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = response_headers(upstream) + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def body() -> None:
            async for chunk in self.upstream.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})

        complete = await relay_until_disconnect(
            self.upstream, receive, send, self.status_code, self.raw_headers, body, "a relayed response"
        )
        if not complete:
            log.info(
                "relayed response not completed (client gone or upstream broke off)",
                extra={"fields": {"status": self.status_code}},
            )
