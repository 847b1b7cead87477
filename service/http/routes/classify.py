"""POST /v1/classify: validate, resolve policies, hand over to the engine, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.core.engine import Classification, Timings, cache_outcome
from service.core.errors import ErrorCode
from service.core.metrics import INLINE_POLICY_LABEL
from service.http.deps import EngineDep, SettingsDep, add_access_log_fields, log_prompt
from service.http.openapi import error_responses
from service.http.schemas import ClassifyManyResponse, ClassifyRequest, ClassifyResponse
from service.http.strict_body import StrictJsonRoute

router = APIRouter(tags=["classify"], route_class=StrictJsonRoute)

# Documented in OpenAPI; all answer the error shape of service.core.errors.
_ERRORS = error_responses(
    ErrorCode.unknown_policy,
    ErrorCode.prompt_too_long,
    ErrorCode.body_too_large,
    ErrorCode.invalid_request,
    ErrorCode.empty_prompt,
    ErrorCode.policy_too_long,
    ErrorCode.too_many_policies,
    ErrorCode.queue_full,
    ErrorCode.not_ready,
    ErrorCode.deadline_exceeded,
    notes={ErrorCode.queue_full: "see Retry-After"},
)


# Whether the verdicts came from the verdict cache: hit (all), partial, miss (none).
CACHE_HEADER = "x-uniguard-cache"


def set_cache_header(response: Response, classifications: list[Classification]) -> None:
    response.headers[CACHE_HEADER] = cache_outcome(classifications)


def set_timing_headers(response: Response, t: Timings) -> None:
    response.headers["x-queue-time"] = f"{t.queue_ms:.3f}"
    response.headers["x-inference-time"] = f"{t.inference_ms:.3f}"
    response.headers["x-total-time"] = f"{t.total_ms:.3f}"


@router.post("/v1/classify", responses=_ERRORS)
async def classify(
    body: ClassifyRequest, engine: EngineDep, settings: SettingsDep, request: Request, response: Response
) -> ClassifyResponse | ClassifyManyResponse:
    """Judge a prompt against one policy, a list of served policies, or an inline policy."""
    if body.policy is not None:
        policies, inline = [body.policy], True
    else:
        assert body.policy_id is not None
        policies, inline = engine.resolve(body.policy_id), False
    add_access_log_fields(request, policies=[INLINE_POLICY_LABEL] if inline else [p.id for p in policies])
    log_prompt(request, settings, body.prompt)
    result = await engine.classify(policies, body.prompt, inline=inline, sensitivity=body.sensitivity)
    add_access_log_fields(request, unsafe=result.unsafe)
    set_timing_headers(response, result.timings)
    set_cache_header(response, [result])
    level = body.sensitivity or settings.sensitivity
    if isinstance(body.policy_id, list):
        return ClassifyManyResponse.from_classification(result, level)
    return ClassifyResponse.from_classification(result, level)
