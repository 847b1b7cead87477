"""POST /v1/chat/completions: an OpenAI-compatible guard in front of an upstream LLM.

1. Each message is judged under the policies its role maps to (``service.gateway.roles``;
   default: user under ``guard_policies``, tool and function results under
   ``prompt_injection``, system and developer not judged, assistant under the output
   policies; ``role_policies`` changes it): string content, or the ``{"type": "text"}``
   parts of a content list (images, audio and files are not judged). The header
   ``x-uniguard-retrieved: 2,5`` marks messages (by index) as retrieved documents: they are
   judged under the ``retrieved`` entry (``prompt_injection``) too. The header is not forwarded.
2. Unsafe: an OpenAI-shaped refusal (``refusal_message``, ``finish_reason:
   "content_filter"``, the violations in the extra top-level field ``uniguard``), as a
   ``chat.completion`` or, for ``stream: true``, as ``chat.completion.chunk`` SSE events
   ending in ``data: [DONE]``. The upstream is not called.
3. Safe: the request body goes to ``upstream_base_url + /chat/completions`` byte for byte
   and the upstream's status, headers and body come back unchanged, streamed chunk by
   chunk (see ``service.gateway.upstream``).
4. ``moderate_output`` (non-streamed calls): a 200 answer's message contents are judged
   against ``output_policies``; an unsafe answer is replaced by the refusal.
5. ``moderate_stream`` (``stream: true``): a 200 event stream is judged while it is relayed,
   text held back until judged, and cut with a ``content_filter`` chunk and ``[DONE]`` when
   unsafe (``service.gateway.stream_moderation``); an upstream that answers a stream request with a
   complete JSON answer gets it judged whole, as in 4.

Every answer carries ``x-uniguard-action``: ``allowed``, ``blocked`` or ``unguarded``, and
``x-uniguard-cache``: ``hit`` when every verdict on the request came from the verdict cache,
``partial``, or ``miss``.
When the model cannot score, the service fails closed with the error (503 ``not_ready``,
429 ``queue_full``, 504 ``deadline_exceeded``: OpenAI clients retry these); with
``fail_open`` the request is forwarded unguarded instead, but only for ``not_ready`` and
``queue_full`` (causes outside the request): a request refused for its own size (413) or
its own deadline (504) is never forwarded. More than ``max_messages_per_chat`` messages:
413 ``too_many_texts``. An unreachable upstream is 502
``upstream_error``, a silent one 504 ``upstream_timeout``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.core.metrics import Metrics
from service.gateway.chat_text import guarded_texts, message_text
from service.gateway.judge import EngineSource, GuardText, Judgement, check_count, judge
from service.gateway.roles import RolePolicies, parse_retrieved
from service.gateway.stream_moderation import ModeratedStreamResponse, StreamModerator
from service.gateway.upstream import ProxiedResponse, Upstream, forward_headers, response_headers
from service.http.auth import AUTH_HEADER_STATE_KEY
from service.http.deps import EngineSourceDep, MetricsDep, SettingsDep, add_access_log_fields, log_prompt
from service.http.openapi import error_responses
from service.http.routes.classify import CACHE_HEADER
from service.http.strict_body import parse_json

router = APIRouter(tags=["openai-proxy"])

PATH = "/v1/chat/completions"
UPSTREAM_PATH = "/chat/completions"
ACTION_HEADER = "x-uniguard-action"
RETRIEVED_HEADER = "x-uniguard-retrieved"
MAX_CHOICES = 16


def get_upstream(request: Request) -> Upstream:
    upstream: Upstream = request.app.state.upstream  # set by create_app; Starlette's State is untyped
    return upstream


def _invalid(message: str, details: Any = None) -> ApiError:
    return ApiError(ErrorCode.invalid_request, message, details)


def parse_body(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)  # strict: the document the upstream reads from the same bytes
    if not isinstance(body, dict):
        raise _invalid("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list", [{"loc": ["body", "messages"]}])
    return body


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES else 1


def refusal_completion(
    settings: Settings, body: dict[str, Any], summary: dict[str, Any], base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` whose every choice is the refusal. ``base``: an upstream answer whose
    id, created, model and usage are kept (output moderation)."""
    base = base or {}
    model = base.get("model") or body.get("model")
    return {
        "id": base.get("id") or f"chatcmpl-uniguard-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": base.get("created") or int(time.time()),
        "model": model if isinstance(model, str) else "uniguard",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": settings.refusal_message, "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
            for i in range(_choices(body))
        ],
        "usage": base.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "system_fingerprint": None,
        "uniguard": summary,
    }


def refusal_events(settings: Settings, body: dict[str, Any], summary: dict[str, Any]) -> Iterator[bytes]:
    """The refusal as ``chat.completion.chunk`` server-sent events, as OpenAI streams them."""
    completion = refusal_completion(settings, body, summary)
    common = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": common["id"],
            "object": "chat.completion.chunk",
            "created": common["created"],
            "model": common["model"],
            "system_fingerprint": None,
            "choices": choices,
            **extra,
            "uniguard": summary,
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    n = len(completion["choices"])
    yield event(
        [
            {
                "index": i,
                "delta": {"role": "assistant", "content": settings.refusal_message},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(n)
        ]
    )
    yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"} for i in range(n)])
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        yield event([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"


def refusal_response(
    settings: Settings, body: dict[str, Any], judgement: Judgement, stage: str, base: dict[str, Any] | None = None
) -> Response:
    summary = judgement.summary(stage)
    headers = {ACTION_HEADER: "blocked", CACHE_HEADER: judgement.cache}
    if body.get("stream") is True:
        headers["cache-control"] = "no-cache"
        return StreamingResponse(
            refusal_events(settings, body, summary), media_type="text/event-stream", headers=headers
        )
    return JSONResponse(refusal_completion(settings, body, summary, base), headers=headers)


def answer_texts(answer: Any) -> list[GuardText]:
    """The assistant contents of a chat.completion (string or text parts)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return []
    out = []
    for i, choice in enumerate(answer["choices"]):
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            try:
                out.append(GuardText(i, message_text(message, i), "assistant"))
            except ApiError:
                continue
    return out


# The request body as the proxy reads it: only what it checks is constrained, the rest goes
# upstream untouched (documented, not validated by FastAPI: the raw bytes are forwarded).
CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": True,
    "properties": {
        "model": {"description": "Forwarded as is."},
        "stream": {"description": "true: the answer (or the refusal) is streamed as server-sent events."},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "additionalProperties": True,
                "properties": {
                    "role": {"type": "string"},
                    "content": {
                        "description": "For roles judged (UNIGUARD_ROLE_POLICIES: user, tool, function, assistant "
                        'and unknown roles by default): a string, null, or a list of part objects whose {"type": '
                        '"text"} parts carry a string "text" (422 otherwise). Roles not judged (system, developer) '
                        "are forwarded unread."
                    },
                },
            },
        },
    },
}


@router.post(
    PATH,
    responses={
        200: {
            "description": "the upstream's answer unchanged, or the refusal (x-uniguard-action: blocked)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                # one schema per server-sent event
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    }
                },
            },
        },
        **error_responses(
            ErrorCode.prompt_too_long,
            ErrorCode.too_many_texts,
            ErrorCode.body_too_large,
            ErrorCode.invalid_request,
            ErrorCode.queue_full,
            ErrorCode.internal_error,
            ErrorCode.upstream_not_configured,
            ErrorCode.upstream_error,
            ErrorCode.not_ready,
            ErrorCode.deadline_exceeded,
            ErrorCode.upstream_timeout,
            notes={
                ErrorCode.queue_full: "fail-closed unless fail_open",
                ErrorCode.not_ready: "fail-closed unless fail_open",
                ErrorCode.deadline_exceeded: "fail-closed, even with fail_open",
                ErrorCode.internal_error: "configured policies not served",
            },
        ),
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}}}},
)
async def chat_completions(
    request: Request, settings: SettingsDep, get_engine: EngineSourceDep, metrics: MetricsDep
) -> Response:
    """Guard an OpenAI chat completion; forward it unchanged when every guarded message is safe."""
    upstream = get_upstream(request)
    upstream.require_configured()
    raw = await request.body()
    body = parse_body(raw)
    check_count(len(body["messages"]), settings.max_messages_per_chat, "messages")
    stream = body.get("stream") is True
    try:
        retrieved = parse_retrieved(request.headers.get(RETRIEVED_HEADER))
    except ValueError as exc:
        raise _invalid(f"{RETRIEVED_HEADER} must list message indexes separated by commas: {exc}") from exc
    texts = guarded_texts(body["messages"], RolePolicies.of(settings), retrieved=retrieved)
    add_access_log_fields(
        request,
        policies=list(dict.fromkeys(settings.guard_policies)),
        stream=stream,
        messages=len(body["messages"]),
        guarded=len(texts),
    )
    log_prompt(request, settings, "\n\n".join(t.text for t in texts))

    judgement = await judge(
        get_engine, metrics, texts, settings.guard_policies, route=PATH, from_config=True, fail_open=settings.fail_open
    )
    add_access_log_fields(request, guard=judgement.outcome, unsafe=judgement.unsafe)
    if judgement.unsafe:
        return refusal_response(settings, body, judgement, "input")

    # Headers that carried UniGuard's own key are never forwarded.
    drop = [*getattr(request.state, AUTH_HEADER_STATE_KEY, ()), RETRIEVED_HEADER]
    moderating = settings.moderate_stream if stream else settings.moderate_output
    if moderating:  # the answer must be read here: ask for it uncompressed
        drop.append("accept-encoding")
    headers = forward_headers(request.headers.raw, drop=drop, api_key=upstream.api_key)
    if moderating:
        headers.append(("accept-encoding", "identity"))
    resp = await upstream.send("POST", UPSTREAM_PATH, headers, raw)
    add_access_log_fields(request, upstream_status=resp.status_code)
    if not (moderating and resp.status_code == 200):
        return ProxiedResponse(resp, [(ACTION_HEADER, judgement.outcome), (CACHE_HEADER, judgement.cache)])
    if stream and resp.headers.get("content-type", "").startswith("text/event-stream"):
        return moderated_stream(request, settings, get_engine, metrics, resp, judgement)
    # A complete answer (also when the upstream ignored "stream": true): judged whole.
    return await moderate(request, settings, get_engine, metrics, upstream, body, resp, judgement)


def moderated_stream(
    request: Request,
    settings: Settings,
    get_engine: EngineSource,
    metrics: Metrics,
    resp: httpx.Response,
    input_judgement: Judgement,
) -> Response:
    """Relay a streamed answer through the stream moderator (``service.gateway.stream_moderation``)."""
    policies = settings.output_policies or settings.guard_policies

    async def check(items: list[GuardText]) -> Judgement:
        return await judge(
            get_engine, metrics, items, policies, route=PATH, from_config=True, fail_open=settings.fail_open
        )

    moderator = StreamModerator(
        check, check_every=settings.stream_check_every_chars, holdback=settings.stream_holdback_chars
    )

    def on_end(outcome: str) -> None:
        add_access_log_fields(request, output_guard=outcome, stream_checks=moderator.checks)

    # httpx decodes the body: relay every header but the encoding (the length is dropped for streams anyway).
    headers = [
        *response_headers(resp, drop=["content-encoding"]),
        (ACTION_HEADER.encode(), input_judgement.outcome.encode()),
        (CACHE_HEADER.encode(), input_judgement.cache.encode()),
    ]
    return ModeratedStreamResponse(resp, moderator, headers, on_end)


async def moderate(
    request: Request,
    settings: Settings,
    get_engine: EngineSource,
    metrics: Metrics,
    upstream: Upstream,
    body: dict[str, Any],
    resp: httpx.Response,
    input_judgement: Judgement,
) -> Response:
    """Judge a complete (non-streamed) answer; relay it (decoded) or replace it with the refusal."""
    content = await upstream.read(resp)
    try:
        answer = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        answer = None
    policies = settings.output_policies or settings.guard_policies
    judgement = await judge(
        get_engine, metrics, answer_texts(answer), policies, route=PATH, from_config=True, fail_open=settings.fail_open
    )
    add_access_log_fields(request, output_guard=judgement.outcome)
    if judgement.unsafe:
        return refusal_response(settings, body, judgement, "output", base=answer)
    outcome = "unguarded" if "unguarded" in (input_judgement.outcome, judgement.outcome) else "allowed"
    out = Response(content=content, status_code=resp.status_code)
    # httpx decoded the body: relay every header but the encoding and length (recomputed).
    out.raw_headers = [h for h in out.raw_headers if h[0] == b"content-length"]
    out.raw_headers += [
        *response_headers(resp, drop=["content-encoding"]),
        (ACTION_HEADER.encode(), outcome.encode()),
        (CACHE_HEADER.encode(), input_judgement.cache.encode()),
    ]
    return out
