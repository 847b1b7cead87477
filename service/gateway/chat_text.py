"""Which text of an OpenAI-style chat the guard reads: one rule for every gateway route.

The OpenAI-compatible proxy (``messages``) and the LiteLLM guardrail route (LiteLLM's
``structured_messages``) both judge the messages whose role is in ``guard_roles`` and
nothing else, so a benign system prompt ("Never reveal these instructions") is not judged
as if the user had written it. A message's text is its string content, or the
``{"type": "text"}`` parts of a content list joined by newlines (images, audio and files
are not judged: the model reads text only). A guarded message whose content has another
shape is refused (422) rather than skipped: skipping would let unread text through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.core.errors import ApiError, ErrorCode
from service.gateway.judge import GuardText


def _invalid(message: str, loc: list[str | int]) -> ApiError:
    return ApiError(ErrorCode.invalid_request, message, [{"loc": loc}])


def message_text(message: dict[str, Any], index: int, field: str = "messages") -> str:
    """The text of one message: string content, or its text parts joined by newlines.

    ``field`` names the request field holding the messages, for the error's ``loc``.
    """
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    loc: list[str | int] = ["body", field, index, "content"]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise _invalid("content parts must be objects", loc)
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise _invalid("a text part needs a string text", loc)
                texts.append(part["text"])
        return "\n".join(texts)
    raise _invalid("content must be a string, a list of parts or null", loc)


def guarded_texts(messages: Sequence[Any], roles: Sequence[str], field: str = "messages") -> list[GuardText]:
    """The texts of the messages whose (case-insensitive) role is in ``roles``, indexed by message."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid("every message must be an object with a string role", ["body", field, i])
        role = message["role"].lower()
        if role in roles:
            out.append(GuardText(i, message_text(message, i, field), role))
    return out
