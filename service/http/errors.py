"""The HTTP half of the errors: ``ApiError`` and framework errors answered in the one shape.

The codes, their statuses and the body shape live in ``service.core.errors``; this module
installs the FastAPI handlers that answer with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import ApiError, ErrorCode, error_body


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
