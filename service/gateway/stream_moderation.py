"""Streamed answer moderation (``moderate_stream``): judge an SSE answer while relaying it.

The upstream's ``chat.completion.chunk`` events are read as they come and kept back until
the text they carry has been judged; released events go to the client byte for byte, in
order. Per choice:

* a check runs once ``check_every`` characters of content arrived since the last one, and
  once more at the end of the stream (``data: [DONE]`` or the upstream closing);
* a check reads the new text together with the ``max(holdback, CONTEXT_CHARS)``
  characters before it, so a violation split between two checks is read whole, and the
  cost of a stream stays linear in its length;
* after a passing check, events are released up to ``holdback`` characters before the end
  of the judged text: those last characters wait for the next check, which reads them with
  what follows. Text is never sent before a check passed on it; events are not split, so
  an event straddling the line waits whole.

A failing check ends the stream: one chunk whose every seen choice has ``finish_reason:
"content_filter"`` (and the verdicts in ``uniguard``), then ``data: [DONE]``; the upstream
connection is closed. The client has then seen at most the answer up to ``holdback``
characters before the end of the last passing check, never the text that failed.
When a check cannot score (model not ready, queue full, deadline) the stream ends with an
OpenAI-style ``data: {"error": ...}`` event (the SDKs raise it) unless ``fail_open``, where
the judged-unguarded text is released. What is judged is what a client could display: every
text a choice carries (``delta.content`` as a string or a list of parts, reasoning content,
refusals, tool-call arguments, a ``message`` object), under the choice index a client reads
(``0``, ``0.0`` and ``"0"`` alike); an event whose data is not one JSON document is read line
by line, and a line that is not JSON is judged as text (as one more answer, ``OTHER``), so
nothing the proxy cannot read is relayed unjudged. A byte-order mark before the first event
is dropped, as clients drop it.

Nothing here knows HTTP routes or the model: the route passes ``check``, which judges
``GuardText`` items (index = choice index) and returns a ``Judgement``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.core.errors import ApiError, ErrorCode
from service.gateway.chat_text import texts_in
from service.gateway.judge import GuardText, Judgement
from service.gateway.upstream import relay_until_disconnect

log = logging.getLogger("uniguard.stream")

# Text before the unjudged part that a check reads with it (at least): two sentences or so, so a
# sentence cut by a check boundary is read whole; more would cost model windows on every check.
CONTEXT_CHARS = 200
# An SSE event ends at an empty line; a line ends at CRLF, LF or CR (WHATWG server-sent events).
_LINE_END = rb"(?:\r\n|\r(?!\n)|\n)"
_EVENT_END = re.compile(_LINE_END + _LINE_END)
_LINE_SPLIT = re.compile(_LINE_END)
DONE = "[DONE]"
# Longest event the moderator keeps while waiting for its end (chat chunks are a few hundred bytes).
MAX_EVENT_BYTES = 1_000_000

Check = Callable[[list[GuardText]], Awaitable[Judgement]]


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each with its terminating blank line) and the incomplete rest."""
    events = []
    start = 0
    for match in _EVENT_END.finditer(buffer):
        events.append(buffer[start : match.end()])
        start = match.end()
    return events, buffer[start:]


def event_data(event: bytes) -> str | None:
    """The event's ``data`` field (several data lines joined by newlines), None when it has none."""
    lines = [line for line in _LINE_SPLIT.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    values = [line[5:].removeprefix(b" ") for line in lines]
    return b"\n".join(values).decode("utf-8", errors="replace")


# Texts of an event that belong to no choice (not JSON, no choices list): judged as one more answer.
OTHER = -1
IDENTITY_KEYS = ("id", "created", "model", "system_fingerprint")


def _choice_index(value: Any) -> int:
    """A choice index as a client reads it (``0``, ``0.0`` and ``"0"`` are the first choice);
    anything else is OTHER."""
    if isinstance(value, bool):
        return OTHER
    if isinstance(value, int):
        return value if value >= 0 else OTHER
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return OTHER


def chunk_texts(chunk: Any) -> list[tuple[int, str]]:
    """(choice index, text) of one parsed event: every text a choice carries, whatever its
    shape (``delta.content`` as a string or parts, ``reasoning_content``, ``refusal``, a
    ``message`` object, ``text``...), and the texts outside the choices under OTHER."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        text = "".join(texts_in(chunk)) if not isinstance(chunk, (int, float)) or isinstance(chunk, bool) else ""
        return [(OTHER, text)] if text else []
    out = []
    for choice in chunk["choices"]:
        index = _choice_index(choice.get("index", 0)) if isinstance(choice, dict) else OTHER
        text = "".join(texts_in(choice))
        if text:
            out.append((index, text))
    rest = "".join(texts_in({k: v for k, v in chunk.items() if k != "choices"}))
    if rest:
        out.append((OTHER, rest))
    return out


def event_texts(data: str) -> list[tuple[int, str]]:
    """(choice index, text) of an event's data: parsed as one JSON document (duplicate keys:
    the last wins, as clients read them); else each data line on its own; a line that is not
    JSON is judged as it stands."""
    try:
        return chunk_texts(json.loads(data))
    except ValueError:
        pass
    out = []
    for line in data.split("\n"):
        try:
            out += chunk_texts(json.loads(line))
        except ValueError:
            if line.strip():
                out.append((OTHER, line))
    return out


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    length: int = 0
    checked: int = 0  # characters judged safe (a prefix of the answer)

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        joined = "".join(self.parts)
        self.parts = [joined]
        return joined


@dataclass
class _Pending:
    raw: bytes
    needs: dict[int, int]  # choice index -> end of this event's text in that choice's answer


class StreamModerator:
    """Holds SSE events back until their text passed a check; see the module docstring."""

    def __init__(self, check: Check, *, check_every: int, holdback: int, stage: str = "output") -> None:
        self.check = check
        self.check_every = check_every
        self.holdback = holdback
        self.context = max(holdback, CONTEXT_CHARS)
        self.stage = stage
        self.choices: dict[int, _Choice] = {}
        self.pending: deque[_Pending] = deque()
        self.buffer = b""
        self.started = False  # the first event was read (a leading byte-order mark dropped)
        self.finished = False
        self.identity: dict[str, Any] = {}  # id, created, model of the upstream's chunks (for the cut chunk)
        self.checks = 0
        # then allowed, unguarded (fail_open let unscored text through), blocked (a check failed) or error
        self.outcome = "incomplete"
        self.judgement: Judgement | None = None  # the failing check's
        self.unguarded = False  # a check could not score and fail_open let the text through

    @property
    def done(self) -> bool:
        """Nothing more to read: [DONE] seen, or the stream was cut."""
        return self.finished or self.outcome != "incomplete"

    async def feed(self, data: bytes) -> list[bytes]:
        """Take upstream bytes; return the events that may go to the client now (on a cut: the ending)."""
        if self.done:
            return []
        events, self.buffer = split_events(self.buffer + data)
        if len(self.buffer) > MAX_EVENT_BYTES:
            self.outcome = "error"
            message = f"the upstream sent an event of more than {MAX_EVENT_BYTES} bytes; the stream was ended"
            return [error_event(ApiError(ErrorCode.upstream_error, message))]
        for event in events:
            self._take(event)
            if self.finished:
                break
        due = [i for i, c in self.choices.items() if self.finished or c.length - c.checked >= self.check_every]
        return await self._check(due) or self._release()

    async def finish(self) -> list[bytes]:
        """The upstream closed: judge what is left and release everything (an incomplete last event included)."""
        if self.outcome != "incomplete":
            return []
        if not self.finished:
            if self.buffer:
                self._take(self.buffer)
                self.buffer = b""
            self.finished = True
            cut = await self._check(list(self.choices))
            if cut:
                return cut
        self.outcome = "unguarded" if self.unguarded else "allowed"
        return self._release()

    def _take(self, event: bytes) -> None:
        if not self.started:  # a byte-order mark before the first event: clients drop it, so do we
            self.started = True
            event = event.removeprefix(b"\xef\xbb\xbf")
        data = event_data(event)
        if data is not None and data.strip() == DONE:
            self.finished = True
            self.pending.append(_Pending(event, {}))
            return
        if data is None:
            self.pending.append(_Pending(event, {}))
            return
        try:
            chunk = json.loads(data)
            texts = chunk_texts(chunk)  # parsed once: the common case, one JSON document per event
        except ValueError:
            chunk, texts = None, event_texts(data)
        if isinstance(chunk, dict):
            for key in IDENTITY_KEYS:
                if key in chunk and key not in self.identity and isinstance(chunk[key], (str, int)):
                    self.identity[key] = chunk[key]
        needs = {}
        for index, text in texts:
            choice = self.choices.setdefault(index, _Choice())
            choice.append(text)
            needs[index] = choice.length
        self.pending.append(_Pending(event, needs))

    async def _check(self, indices: Sequence[int]) -> list[bytes]:
        """Judge the due choices; the events that end the stream if that fails, else [] (and they advance)."""
        items = []
        for i in sorted(indices):
            choice = self.choices[i]
            if choice.length > choice.checked:
                start = max(0, choice.checked - self.context)
                items.append(GuardText(i, choice.text()[start:], "assistant"))
        if not items:
            return []
        self.checks += 1
        try:
            judgement = await self.check(items)
        except ApiError as exc:
            self.outcome = "error"
            return [error_event(exc)]
        if judgement.unsafe:
            self.outcome, self.judgement = "blocked", judgement
            return [self._cut_event(judgement), b"data: [DONE]\n\n"]
        self.unguarded = self.unguarded or judgement.unguarded is not None
        for item in items:
            self.choices[item.index].checked = self.choices[item.index].length
        return []

    def _frontier(self, index: int) -> int:
        choice = self.choices[index]
        if self.finished and choice.checked == choice.length:  # the final check passed: nothing is held back
            return choice.length
        return choice.checked - self.holdback

    def _release(self) -> list[bytes]:
        out = []
        while self.pending and all(end <= self._frontier(i) for i, end in self.pending[0].needs.items()):
            out.append(self.pending.popleft().raw)
        return out

    def _cut_event(self, judgement: Judgement) -> bytes:
        indices = sorted(i for i in self.choices if i != OTHER) or [0]
        chunk: dict[str, Any] = {
            "id": self.identity.get("id") or "chatcmpl-uniguard",
            "object": "chat.completion.chunk",
            "created": self.identity.get("created") or int(time.time()),
            "model": self.identity.get("model") or "uniguard",
            "system_fingerprint": self.identity.get("system_fingerprint"),
            "choices": [
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"} for i in indices
            ],
            "uniguard": judgement.summary(self.stage),
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def error_event(exc: ApiError) -> bytes:
    """An OpenAI-style in-stream error (the OpenAI SDK raises ``APIError`` on it)."""
    error = {"code": exc.code.value, "type": exc.code.value, "message": exc.message, "param": None}
    return b"data: " + json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n\n"


class ModeratedStreamResponse(Response):
    """Relays an upstream SSE answer through a ``StreamModerator``.

    Status and headers go out at once (the upstream's, less ``content-encoding``: the body
    is read decoded); events follow as checks release them. Like ``ProxiedResponse``, the
    upstream connection is closed when the client goes away, and an upstream that breaks
    off cuts the client's stream short (no final chunk).
    """

    def __init__(
        self,
        upstream: httpx.Response,
        moderator: StreamModerator,
        headers: list[tuple[bytes, bytes]],
        on_end: Callable[[str], None] | None = None,  # called with the moderator's outcome once the stream ended
    ) -> None:
        self.upstream = upstream
        self.moderator = moderator
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = headers
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        moderator = self.moderator

        async def emit(events: Iterable[bytes]) -> None:
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})

        async def body() -> None:
            async for data in self.upstream.aiter_bytes():
                await emit(await moderator.feed(data))
                if moderator.done:
                    break
            await emit(await moderator.finish())

        try:
            await relay_until_disconnect(
                self.upstream, receive, send, self.status_code, self.raw_headers, body, "a moderated stream"
            )
        finally:
            if self.on_end is not None:
                self.on_end(moderator.outcome)
