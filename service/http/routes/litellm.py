"""POST /beta/litellm_basic_guardrail_api: LiteLLM's generic guardrail API.

LiteLLM (``guardrail: generic_guardrail_api``, ``api_base: <this server>``) posts the texts
it extracted from a request (``input_type: "request"``) or from the model's answer
(``"response"``); the answer ``{"action": "BLOCKED", "blocked_reason": ...}`` makes it
reject the call, ``{"action": "NONE"}`` lets it through unchanged. UniGuard never rewrites
text, so it never answers ``GUARDRAIL_INTERVENED``.

Policies: by role for requests (below), ``output_policies`` (else ``guard_policies``) for
responses, or per request ``additional_provider_specific_params: {"policies": [...]}``
(set under the guardrail's ``litellm_params`` in LiteLLM's config), which then judges every
judged message under those policies.

What is judged: for a request that carries ``structured_messages`` (recent LiteLLM, 1.108.7 included, sends
the chat's messages with their roles beside ``texts``), each message under the policies its
role maps to, exactly as the OpenAI-compatible proxy judges them (``service.gateway.roles``,
``service.gateway.chat_text``): user messages under the guard policies, tool and function
results under ``prompt_injection``, the operator's system prompt not at all. Messages marked
as retrieved documents by the client's ``x-uniguard-retrieved`` header (indexes into the
messages LiteLLM sends; LiteLLM forwards the header's value when the guardrail lists it
under ``extra_headers``) are judged under ``prompt_injection`` too. Otherwise (older LiteLLM,
answers: ``input_type: "response"``) every text, under the guard (or output) policies.
Images and tool definitions are never judged (the model reads text only). When the model cannot
score, the error status goes back (fail-closed: LiteLLM then fails the call, or lets it
through on 502/503/504 if its own ``unreachable_fallback: fail_open`` is set); with
UniGuard's ``fail_open`` the answer is ``NONE`` when the model is unavailable for reasons
outside the request (not ready, queue full), never for the request's own size or deadline
(``service.gateway.judge``). More than ``max_texts_per_request`` texts: 413 ``too_many_texts``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from service.contract.policy import POLICY_ID_PATTERN
from service.core.errors import ApiError, ErrorCode
from service.gateway.chat_text import guarded_texts, message_text, texts_in
from service.gateway.judge import GuardText, check_count, judge
from service.gateway.roles import RolePolicies, parse_retrieved
from service.http.deps import EngineSourceDep, MetricsDep, SettingsDep, add_access_log_fields, log_prompt
from service.http.errors import summarize_validation_errors
from service.http.openapi import error_responses
from service.http.routes.classify import CACHE_HEADER
from service.http.strict_body import StrictJsonRoute

router = APIRouter(tags=["litellm"], route_class=StrictJsonRoute)

PATH = "/beta/litellm_basic_guardrail_api"
POLICIES_PARAM = "policies"

_PolicyIds = TypeAdapter(
    Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)]
    | list[Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)]]
)


class LiteLLMGuardrailRequest(BaseModel):
    """LiteLLM's ``GenericGuardrailAPIRequest``; other fields added by newer LiteLLM versions
    (``tools``, ``tool_calls``, ``model``, ``request_headers``...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    texts: list[str] | None = Field(
        None, description="Texts LiteLLM extracted; each one is judged when no structured_messages come with them."
    )
    structured_messages: list[Any] | None = Field(
        None,
        description="The request's chat messages with roles (recent LiteLLM): when present and non-empty on a "
        "request, each message is judged under the policies its role maps to (UNIGUARD_ROLE_POLICIES; their string "
        "content or text parts), and texts is not read. If they cannot be read that way (a message that is not an "
        "object with a string role, content neither a string, null nor a list of part objects), every text is "
        "judged instead.",
    )
    images: list[Any] | None = Field(None, description="Not judged (the model reads text only).")
    input_type: Literal["request", "response"] = "request"
    litellm_call_id: str | None = None
    litellm_trace_id: str | None = None
    request_data: dict[str, Any] | None = Field(None, description="LiteLLM key/user/team metadata (not used).")
    request_headers: dict[str, Any] | None = Field(
        None,
        description="The client's headers as LiteLLM forwards them; x-uniguard-retrieved (message indexes) marks "
        "retrieved documents when LiteLLM forwards its value (the guardrail's extra_headers).",
    )
    additional_provider_specific_params: dict[str, Any] | None = Field(
        None,
        description='Per-request options; {"policies": ["prompt_injection", ...]} overrides the configured policies.',
    )


class LiteLLMGuardrailResponse(BaseModel):
    action: Literal["BLOCKED", "NONE"]
    blocked_reason: str | None = None
    uniguard: dict[str, Any] = Field(description="Verdict summary (policies, violations, model); ignored by LiteLLM.")


def requested_policies(params: dict[str, Any] | None) -> list[str] | None:
    if not params or params.get(POLICIES_PARAM) is None:
        return None
    try:
        value = _PolicyIds.validate_python(params[POLICIES_PARAM])
    except ValidationError as exc:
        raise ApiError(
            ErrorCode.invalid_request,
            "additional_provider_specific_params.policies must be a policy id or a list of them",
            summarize_validation_errors(exc.errors()),
        ) from exc
    return [value] if isinstance(value, str) else value


def retrieved_messages(body: LiteLLMGuardrailRequest) -> frozenset[int]:
    """Indexes of structured_messages the client marked as retrieved documents (``x-uniguard-retrieved``)."""
    headers = {str(k).lower(): v for k, v in (body.request_headers or {}).items()}
    value = headers.get("x-uniguard-retrieved")
    if not isinstance(value, str):
        return frozenset()
    try:
        return parse_retrieved(value)
    except ValueError as exc:
        raise ApiError(
            ErrorCode.invalid_request, f"x-uniguard-retrieved must list message indexes separated by commas: {exc}"
        ) from exc


def litellm_texts(body: LiteLLMGuardrailRequest, roles: RolePolicies) -> tuple[list[GuardText], bool]:
    """What to judge, and whether it was chosen by role.

    The messages of a request with readable ``structured_messages``, each under its role's
    policies (``service.gateway.chat_text``: every text of every part), plus every entry of
    ``texts`` that no message holds, under the guard policies (a shape this route cannot match
    to a message is judged, never dropped); else every text. Answers (``input_type:
    "response"``) are always judged whole (their role is the model's). Structured messages this
    route cannot read (not objects with a string role, content neither a string, null nor a
    list) fall back to every text rather than a 422: texts hold the same words, so nothing goes
    unjudged, and LiteLLM's call is not failed for it.
    """
    texts = body.texts or []
    if body.input_type == "request" and body.structured_messages:
        retrieved = retrieved_messages(body)
        try:
            guarded = guarded_texts(body.structured_messages, roles, "structured_messages", retrieved)
            held = set()
            for i, message in enumerate(body.structured_messages):
                held.add(message_text(message, i, "structured_messages"))
                held.update(texts_in(message.get("content")))
        except ApiError:
            pass
        else:
            extra = [GuardText(i, t) for i, t in enumerate(texts) if t not in held]  # index in texts, no role
            return [*guarded, *extra], True
    return [GuardText(i, t) for i, t in enumerate(texts)], False


@router.post(
    PATH,
    responses=error_responses(
        ErrorCode.unknown_policy,
        ErrorCode.prompt_too_long,
        ErrorCode.too_many_texts,
        ErrorCode.body_too_large,
        ErrorCode.invalid_request,
        ErrorCode.too_many_policies,
        ErrorCode.policy_too_long,
        ErrorCode.queue_full,
        ErrorCode.internal_error,
        ErrorCode.not_ready,
        ErrorCode.deadline_exceeded,
        notes={
            ErrorCode.unknown_policy: "per-request policies",
            ErrorCode.internal_error: "configured policies not served",
            ErrorCode.queue_full: "fail-closed unless fail_open",
            ErrorCode.not_ready: "fail-closed unless fail_open",
            ErrorCode.deadline_exceeded: "fail-closed, even with fail_open",
        },
    ),
)
async def litellm_guardrail(
    body: LiteLLMGuardrailRequest,
    request: Request,
    response: Response,
    settings: SettingsDep,
    get_engine: EngineSourceDep,
    metrics: MetricsDep,
) -> LiteLLMGuardrailResponse:
    """Judge LiteLLM's texts (by role when it sends structured_messages): BLOCKED if any is unsafe, else NONE."""
    override = requested_policies(body.additional_provider_specific_params)
    if override is not None:
        policy_ids = override
    elif body.input_type == "response":
        policy_ids = settings.output_policies or settings.guard_policies
    else:
        policy_ids = settings.guard_policies
    check_count(len(body.texts or []), settings.max_texts_per_request, "texts")
    check_count(len(body.structured_messages or []), settings.max_messages_per_chat, "structured_messages")
    items, by_role = litellm_texts(body, RolePolicies.of(settings))
    if override is not None:  # the request's policies judge every message its role lets be judged
        items = [replace(item, policies=()) for item in items]
    add_access_log_fields(
        request,
        litellm_call_id=body.litellm_call_id,
        litellm_trace_id=body.litellm_trace_id,
        input_type=body.input_type,
        policies=list(dict.fromkeys(policy_ids)),
        texts=len(body.texts or []),
        structured_messages=len(body.structured_messages or []),
        guarded=len(items),
        by_role=by_role,
    )
    log_prompt(request, settings, "\n\n".join(t.text for t in items))
    judgement = await judge(
        get_engine,
        metrics,
        items,
        policy_ids,
        route=PATH,
        from_config=override is None,
        fail_open=settings.fail_open,
    )
    add_access_log_fields(request, guard=judgement.outcome, unsafe=judgement.unsafe)
    stage = "output" if body.input_type == "response" else "input"
    response.headers[CACHE_HEADER] = judgement.cache
    if judgement.unsafe:
        return LiteLLMGuardrailResponse(
            action="BLOCKED", blocked_reason=judgement.reason(), uniguard=judgement.summary(stage)
        )
    return LiteLLMGuardrailResponse(action="NONE", uniguard=judgement.summary(stage))
