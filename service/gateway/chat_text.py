"""Which text of an OpenAI-style chat the guard reads, and under which policies: one rule for every gateway route.

The OpenAI-compatible proxy (``messages``) and the LiteLLM guardrail route (LiteLLM's
``structured_messages``) both judge each message under the policies its role maps to
(``service.gateway.roles``: user under the guard policies, tool and function results under
prompt_injection, system not judged, ...), so a benign system prompt ("Never reveal these
instructions") is not judged as if the user had written it, and an injection inside a tool
result is. A message's text is its string content, or the ``{"type": "text"}`` parts of a
content list joined by newlines (images, audio and files are not judged: the model reads
text only). A judged message whose content has another shape is refused (422) rather than
skipped: skipping would let unread text through.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from service.core.errors import ApiError, ErrorCode
from service.gateway.judge import GuardText
from service.gateway.roles import RolePolicies


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


def guarded_texts(
    messages: Sequence[Any], roles: RolePolicies, field: str = "messages", retrieved: Collection[int] = ()
) -> list[GuardText]:
    """The texts of the messages whose (case-insensitive) role maps to policies, each with those
    policies, indexed by message; ``retrieved``: indexes of messages marked as retrieved documents."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid("every message must be an object with a string role", ["body", field, i])
        role = message["role"].lower()
        policies = roles.for_role(role, retrieved=i in retrieved)
        if policies:
            out.append(GuardText(i, message_text(message, i, field), role, policies))
    return out
