"""JSON request bodies read strictly (``service.http.strict_json``), answered 422 when refused.

``StrictJsonRoute`` is the route class of every router whose routes take a JSON body: the
body is parsed once, strictly, before FastAPI validates it against the route's model (which
then reads the parsed document instead of calling ``json.loads`` itself). Routes that read
the raw body themselves (the proxy) call ``parse_json``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.core.errors import ApiError, ErrorCode
from service.http import strict_json


def parse_json(raw: bytes) -> Any:
    """The body's JSON document, or ApiError invalid_request (422) naming the rule it broke."""
    try:
        return strict_json.loads(raw)
    except strict_json.JsonRejected as exc:
        detail: dict[str, Any] = {"loc": ["body"], "type": exc.kind, "msg": exc.message}
        if exc.details:
            detail["ctx"] = exc.details
        raise ApiError(ErrorCode.invalid_request, exc.message, [detail]) from None


def _is_json(content_type: str | None) -> bool:
    # FastAPI's own rule for parsing a body as JSON: no content type, or application/json / +json.
    if not content_type:
        return True
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class StrictJsonRequest(Request):
    """A request whose ``json()`` is the strict reading (cached like Starlette's)."""

    _strict_json: Any

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = parse_json(await self.body())
        return self._strict_json


class StrictJsonRoute(APIRoute):
    """An APIRoute that refuses a JSON body ``service.http.strict_json`` refuses, before validation."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            request = StrictJsonRequest(request.scope, request.receive)
            if _is_json(request.headers.get("content-type")) and await request.body():
                await request.json()  # raises here, outside FastAPI's own body parsing (which would make it a 400)
            return await handler(request)

        return strict_handler
