"""POST /v1/chat/completions: an OpenAI-compatible guard in front of an upstream LLM.

1. Each message is judged under the policies its role maps to (``service.gateway.roles``;
   default: user under ``guard_policies``, tool and function results under
   ``prompt_injection``, system and developer not judged, assistant under the output
   policies, unknown roles under ``guard_policies``; ``role_policies`` changes it): every text
   it carries, whatever its shape (``service.gateway.chat_text``; images, audio and binary
   files are not judged). The header ``x-uniguard-retrieved: 2,5`` marks messages (by index)
   as retrieved documents: they are judged under the ``retrieved`` entry (``prompt_injection``)
   too. The header is not forwarded.
2. Unsafe: an OpenAI-shaped refusal (``refusal_message``, ``finish_reason:
   "content_filter"``, the violations in the extra top-level field ``uniguard``), as a
   ``chat.completion`` or, for ``stream: true``, as ``chat.completion.chunk`` SSE events
   ending in ``data: [DONE]``. The upstream is not called.
3. Safe: the request body goes to ``upstream_base_url + /chat/completions`` byte for byte
   and the upstream's status, headers and body come back unchanged, streamed chunk by
   chunk (see ``service.gateway.upstream``).
4. ``moderate_output`` (non-streamed calls): a 2xx answer's texts (every text of every
   choice: content strings and parts, reasoning, refusals) are judged against
   ``output_policies``; an unsafe answer is replaced by the refusal. An answer that cannot
   be read as JSON is judged as text, never relayed unjudged.
5. ``moderate_stream`` (``stream: true``): a 2xx event stream is judged while it is relayed,
   text held back until judged, and cut with a ``content_filter`` chunk and ``[DONE]`` when
   unsafe (``service.gateway.stream_moderation``). What the upstream sends decides how it is
   moderated (``text/event-stream``, compared without case, is a stream; anything else is
   judged whole, as in 4); an answer of another kind than the request asked for (``"stream":
   1`` read as true upstream) is moderated when either setting is on.
6. A client that disconnects before the answer's head cancels the upstream call (and any
   judging) at once.

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

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Iterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.core.metrics import Metrics
from service.gateway.chat_text import guarded_texts
from service.gateway.judge import EngineSource, GuardText, Judgement, check_count, judge
from service.gateway.roles import RolePolicies, parse_retrieved
from service.gateway.stream_moderation import (
    ModeratedStreamResponse,
    StreamModerator,
    chunk_texts,
    event_data,
    event_texts,
    split_events,
)
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
    base = {k: v for k, v in (base or {}).items() if json_safe(v)}  # NaN, inf: JSON cannot carry them
    model = base.get("model") or body.get("model")
    created = base.get("created")
    return {
        "id": base.get("id") if isinstance(base.get("id"), str) else f"chatcmpl-uniguard-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created if isinstance(created, int) and not isinstance(created, bool) else int(time.time()),
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


def json_safe(value: Any) -> bool:
    """Whether ``value`` can go out as strict JSON (upstream answers may hold NaN or infinity)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return False
    return True


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


_NOT_JSON = object()
_SSE_DATA = re.compile(rb"^(?:\xef\xbb\xbf)?data:", re.M)


def answer_texts(content: bytes) -> tuple[list[GuardText], Any]:
    """What a client could display of a complete answer, per choice, and the parsed answer.

    A ``chat.completion``: every text of each choice (``service.gateway.stream_moderation.chunk_texts``:
    content as a string or parts, reasoning, refusal...) and any text outside the choices. An
    answer that is not JSON (invalid UTF-8, numbers Python will not read, server-sent events
    under another content type) is judged as text: its events' texts if it holds ``data:``
    lines, else the whole body decoded. Never nothing for a body that holds text."""
    try:
        answer: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        answer = _NOT_JSON
    if answer is not _NOT_JSON:
        pairs = chunk_texts(answer)
    elif _SSE_DATA.search(content):
        events, rest = split_events(content.removeprefix(b"\xef\xbb\xbf"))
        pairs = []
        for event in [*events, rest]:
            data = event_data(event)
            pairs += event_texts(data) if data is not None else []
    else:
        pairs = [(-1, content.decode("utf-8", errors="replace"))]
    joined: dict[int, list[str]] = defaultdict(list)
    for index, text in pairs:
        joined[index].append(text)
    texts = [GuardText(i, "".join(parts), "assistant") for i, parts in joined.items()]
    return texts, (answer if answer is not _NOT_JSON else None)


def is_event_stream(resp: httpx.Response) -> bool:
    """Whether the upstream answered server-sent events (the media type, compared without case)."""
    return str(resp.headers.get("content-type", "")).split(";")[0].strip().lower() == "text/event-stream"


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """``work``'s response, or a bare 499 once the client has gone away: the upstream call (and
    any judging) is cancelled then, not run on for nobody."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    add_access_log_fields(request, client_gone=True)
    return Response(status_code=499)


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
                        "and unknown roles by default): a string, null, or a list of parts, every text of which is "
                        "judged whatever its type (422 for other shapes). Roles not judged (system, developer) are "
                        "forwarded unread."
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

    return await until_disconnect(
        request, forward(request, settings, get_engine, metrics, upstream, raw, body, judgement)
    )


async def forward(
    request: Request,
    settings: Settings,
    get_engine: EngineSource,
    metrics: Metrics,
    upstream: Upstream,
    raw: bytes,
    body: dict[str, Any],
    judgement: Judgement,
) -> Response:
    """Send the judged request upstream and relay the answer, moderated as configured.

    The answer is moderated by what it is, not by what the request asked for: server-sent
    events (by the content type, without case) go through the stream moderator, anything
    else is judged whole. The setting for what the client asked (``moderate_stream`` for
    ``"stream": true``, else ``moderate_output``) decides; an answer of the other kind than
    asked (``"stream": 1`` read as true upstream) is moderated when either setting is on."""
    asked_stream = body.get("stream") is True
    either = settings.moderate_stream or settings.moderate_output
    # Headers that carried UniGuard's own key are never forwarded.
    drop = [*getattr(request.state, AUTH_HEADER_STATE_KEY, ()), RETRIEVED_HEADER]
    if either:  # the answer may have to be read here: ask for it uncompressed
        drop.append("accept-encoding")
    headers = forward_headers(request.headers.raw, drop=drop, api_key=upstream.api_key)
    if either:
        headers.append(("accept-encoding", "identity"))
    resp = await upstream.send("POST", UPSTREAM_PATH, headers, raw)
    add_access_log_fields(request, upstream_status=resp.status_code)
    sse = is_event_stream(resp)
    moderating = (settings.moderate_stream if asked_stream else settings.moderate_output) or (
        sse != asked_stream and either
    )
    if not (moderating and 200 <= resp.status_code < 300):
        return ProxiedResponse(resp, [(ACTION_HEADER, judgement.outcome), (CACHE_HEADER, judgement.cache)])
    if sse:
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
    texts, answer = answer_texts(content)
    policies = settings.output_policies or settings.guard_policies
    judgement = await judge(
        get_engine, metrics, texts, policies, route=PATH, from_config=True, fail_open=settings.fail_open
    )
    add_access_log_fields(request, output_guard=judgement.outcome)
    if judgement.unsafe:
        return refusal_response(settings, body, judgement, "output", base=answer if isinstance(answer, dict) else None)
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
