"""A complete OpenAPI document: every route, every status it can answer, every error body.

Routes declare their own error codes with ``error_responses``; ``install_openapi`` adds
what middleware answers for every route (500 internal_error, 413 body_too_large and 408
request_timeout on bodies, 401 unauthorized when an API key is set, with the security
schemes), and replaces FastAPI's default 422 body (which the service never sends) by the
error shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.config import Settings
from service.core.errors import ErrorCode
from service.http.auth import open_paths
from service.http.schemas import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def error_responses(*codes: ErrorCode, notes: dict[ErrorCode, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: one entry per status, listing its codes, body ErrorResponse."""
    notes = notes or {}
    by_status: dict[int, list[str]] = {}
    for code in codes:
        label = code.value + (f" ({notes[code]})" if code in notes else "")
        by_status.setdefault(code.status, []).append(label)
    return {
        status: {"model": ErrorResponse, "description": ", ".join(labels)}
        for status, labels in sorted(by_status.items())
    }


def _error_entry(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def _add_error(responses: dict[str, Any], status: int, code: ErrorCode) -> None:
    key = str(status)
    if key not in responses:
        responses[key] = _error_entry(code.value)
    elif code.value not in responses[key].get("description", ""):
        responses[key]["description"] = f"{responses[key].get('description', '')}, {code.value}".lstrip(", ")
        responses[key].setdefault("content", {}).setdefault("application/json", {"schema": ERROR_REF})


def complete_schema(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add the middleware-level answers to every operation of a generated schema."""
    public = open_paths(settings.metrics_public)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = op.setdefault("responses", {})
            # FastAPI's own 422 body is never sent: validation errors use the error shape.
            r422 = responses.get("422")
            if r422 and "HTTPValidationError" in str(r422):
                responses["422"] = _error_entry("invalid_request")
            _add_error(responses, 500, ErrorCode.internal_error)
            if method in {"post", "put", "patch"}:
                _add_error(responses, 413, ErrorCode.body_too_large)
                _add_error(responses, 408, ErrorCode.request_timeout)
                _add_error(responses, 422, ErrorCode.invalid_request)
            if settings.api_key is not None and path not in public:
                _add_error(responses, 401, ErrorCode.unauthorized)
                op["security"] = [{"bearer": []}, {"apiKey": []}]
    _document_limits(schemas, settings)
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and unused not in str(schema.get("paths")):
            del schemas[unused]
    if settings.api_key is not None:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "UNIGUARD_API_KEY as a bearer token."},
            "apiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "UNIGUARD_API_KEY (what LiteLLM sends).",
            },
        }
    return schema


def _document_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """This deployment's request limits in the schema (the engine enforces them with its own
    codes: too_many_policies 422, prompt_too_long 413), so schema-valid means accepted."""
    classify = schemas.get("ClassifyRequest", {}).get("properties", {})
    for branch in classify.get("policy_id", {}).get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = settings.max_policies_per_request
    if "prompt" in classify:
        classify["prompt"]["maxLength"] = settings.max_prompt_chars
    texts = schemas.get("LiteLLMGuardrailRequest", {}).get("properties", {}).get("texts", {})
    for branch in texts.get("anyOf", []):
        if branch.get("type") == "array":
            branch.setdefault("items", {})["maxLength"] = settings.max_prompt_chars


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            # Every route declares error_responses, so ErrorResponse is in components already.
            app.openapi_schema = complete_schema(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented hook for a custom schema
