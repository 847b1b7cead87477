"""Service settings: the one place configuration is read, from ``UNIGUARD_*`` env vars.

There is deliberately no module-level settings object: ``create_app`` takes a ``Settings``
so tests and embedders can run several differently configured apps in one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, StringConstraints, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.contract.policy import DEFAULT_POLICIES_DIR, POLICY_ID_PATTERN
from service.contract.textnorm import normalize_text
from service.model.manifest import DEFAULT_SENSITIVITY, Sensitivity

PolicyIdSetting = Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)]
# A policy id, or "@guard" / "@output" for the guard / output policies (service/gateway/roles.py).
RolePolicyEntry = Annotated[str, StringConstraints(pattern=r"^(@guard|@output|[a-z0-9][a-z0-9_\-]{0,63})$")]


def _default_threads() -> int:
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Everything an operator can tune; env var = ``UNIGUARD_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="UNIGUARD_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(
        Path("models/default"), description="Model folder (model.onnx, tokenizer.json, manifest.json)."
    )
    policies_dir: Path = Field(DEFAULT_POLICIES_DIR, description="Folder of *.yaml policies served by id.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    threads: int = Field(default_factory=_default_threads, ge=1, description="onnxruntime intra-op threads.")
    max_batch_size: int = Field(
        8,
        ge=1,
        description="Most windows run in one model call. 8 on CPU (measured, docs/performance.md 'Thread layout': "
        "+15 % windows/s at 64 clients over 32 on 2 cores with VNNI); a GPU wants more (32-64).",
    )
    max_batch_tokens: int = Field(
        4096, ge=1, description="Most padded tokens (windows x longest window) in one model call."
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        description="Longest the oldest window waits for batch-mates while the model is idle (0: dispatch at once; "
        "batches still form while the model is busy).",
    )
    max_padding: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Length bucketing: most padding of any window in a batch, as a share of the longest window (1: no "
        "bucketing).",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="onnxruntime execution provider: cpu (int8 file), cuda (fp16 file), auto (cuda if available and "
        "exported).",
    )
    device_id: int = Field(0, ge=0, description="CUDA device for provider cuda.")
    int8_weights: Literal["auto", "signed", "unsigned"] = Field(
        "auto",
        description="Integer GEMM weights as loaded: signed (u8 x s8, fast and exact with VNNI), unsigned (u8 x u8, "
        "exact on every x86 CPU, 2.4x slower with VNNI), auto (signed where the CPU has VNNI or is not x86). "
        "Scores are bit-identical either way (service/model/int8_weights.py).",
    )
    spinning: bool = Field(
        True,
        description="onnxruntime intra-op threads busy-wait between work. On (measured, docs/performance.md "
        "'Thread layout'): -3 ms at one client on the default model, the same throughput at 64 clients; "
        "off leaves idle cores to other processes.",
    )
    inference_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Inference threads taking batches in turn and calling the model concurrently; default "
        "threads // worker_threads (2 on 2 cores). With several: a lone batch runs on `threads` intra-op threads, "
        "concurrent batches on `worker_threads` each (docs/performance.md 'Thread layout').",
    )
    worker_threads: int = Field(
        1,
        ge=1,
        description="onnxruntime intra-op threads of each inference worker while several run at once (under load); "
        "equal to `threads`: one session for all (the layout before 2026-12-03).",
    )
    max_queue: int = Field(1024, ge=1, description="Most windows waiting; beyond it requests get 429.")
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_policies_per_request: int = Field(16, ge=1)
    max_texts_per_request: int = Field(
        1024,
        ge=1,
        description="Most texts in one LiteLLM guardrail call; more: 413 too_many_texts before any work.",
    )
    max_messages_per_chat: int = Field(
        1024,
        ge=1,
        description="Most messages in one chat completion through the proxy; more: 413 too_many_texts before any work.",
    )
    request_timeout_s: float = Field(10.0, gt=0.0)
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="A request head (request line and headers) must arrive within this long of the connection opening "
        "or of its first byte; else 408 and the connection is closed (slow-header clients).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="A request body must arrive within this long of its head; else 408 request_timeout and the "
        "connection is closed (slow-body clients).",
    )
    window_budget_factor: float = Field(
        0.8,
        ge=0.0,
        description="Admission budget: refuse at once a request whose tokens (plus the work scheduled ahead of it) "
        "do not fit in the time left before request_timeout_s x the measured model throughput x this factor "
        "(0: no budget).",
    )
    min_window_budget: int = Field(
        16,
        ge=1,
        description="The admission budget never falls below this many full-length windows "
        "(16: one window under each of 16 policies).",
    )
    log_prompts: bool = Field(
        False, description="Put prompt text in access logs (off: prompts may hold personal data)."
    )

    verdict_cache_entries: int = Field(
        200_000,
        ge=0,
        description="Verdict cache: most (model, policy, text) scores kept, least recently used out first "
        "(0: off). Keys are digests only, no text is kept; emptied on reload (service/core/verdict_cache.py).",
    )
    verdict_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Verdict cache: most memory its entries take (240 bytes each, measured); the tighter of the two "
        "bounds applies (0: off).",
    )

    # -- operations: thresholds, reloads, shutdown ---------------------------------------
    sensitivity: Sensitivity = Field(
        DEFAULT_SENSITIVITY,
        description="Operating point of every verdict a request does not set itself (the gateway routes, and "
        "/v1/classify without `sensitivity`): strict flags most, permissive fewest; each policy's thresholds per "
        "level are in the model's manifest and GET /v1/policies.",
    )
    thresholds: dict[PolicyIdSetting, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict,
        description='Per-policy threshold overrides (calibrated scale), e.g. {"toxicity": 0.7}; win over the manifest.',
    )
    admin_enabled: bool | None = Field(
        None,
        description="POST /admin/reload: None (default) = on when api_key is set (the key is then required); "
        "true without api_key = loopback clients only; false = off (SIGHUP still reloads).",
    )
    reload_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="A load or reload (policies, model, validation, warm-up) that has not finished after this long "
        "fails (the previous version keeps serving) and releases the reload lock.",
    )
    shutdown_drain_s: float = Field(
        2.0,
        ge=0.0,
        le=300.0,
        description="On SIGTERM, answer /readyz 503 and keep serving this long before refusing new connections.",
    )

    # -- gateway sidecar: auth, LiteLLM guardrail API, OpenAI-compatible proxy ---------------
    # Lists read from env as JSON (`["a","b"]`) or comma-separated (`a,b`).
    api_key: SecretStr | None = Field(
        None,
        description="If set, every route but /healthz and /readyz needs `Authorization: Bearer <key>` or `x-api-key: "
        "<key>`.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without the API key (only matters when api_key is set)."
    )
    guard_policies: Annotated[list[PolicyIdSetting], NoDecode] = Field(
        default_factory=lambda: ["prompt_injection"],
        min_length=1,
        description="Policies the gateway routes apply to prompts.",
    )
    output_policies: Annotated[list[PolicyIdSetting] | None, NoDecode] = Field(
        None,
        description="Policies for model answers (LiteLLM input_type=response, moderate_output); None: guard_policies.",
    )
    role_policies: dict[str, list[RolePolicyEntry]] = Field(
        default_factory=dict,
        description="Which policies judge a chat message by its role, on the proxy and the LiteLLM route (JSON). "
        'Entries replace the defaults\' for the roles they name: user ["@guard"], tool and function '
        '["prompt_injection"], retrieved (messages marked by x-uniguard-retrieved) ["prompt_injection"], system and '
        'developer [] (not judged), assistant ["@output"], "*" (any other role) ["@guard"]. "@guard" is '
        'guard_policies, "@output" output_policies (service/gateway/roles.py).',
    )
    moderation_policies: Annotated[list[PolicyIdSetting] | None, NoDecode] = Field(
        None,
        description="Policies POST /v1/moderations judges under when its model field names none (absent, uniguard, "
        "omni-moderation-latest, ...); None: every served policy.",
    )
    guard_roles: Annotated[list[str] | None, NoDecode] = Field(
        None,
        min_length=1,
        description="Older form of role_policies, still honoured: each role listed (e.g. user,system,tool) is judged "
        "under guard_policies.",
    )
    upstream_base_url: str | None = Field(
        None,
        description="OpenAI-style base URL of the LLM behind the proxy, version included (https://api.openai.com/v1).",
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="If set, sent upstream as `Authorization: Bearer` instead of the client's header."
    )
    upstream_timeout_s: float = Field(
        60.0, gt=0.0, description="Upstream connect/read/write timeout; read is per chunk when streaming."
    )
    upstream_max_connections: int = Field(
        100, ge=1, description="Pooled connections to the upstream (streams hold one each)."
    )
    refusal_message: str = Field(
        "Sorry, I can't help with that: the request was blocked by the content policy.", min_length=1
    )
    fail_open: bool = Field(
        False,
        description="Forward unguarded when the model is unavailable for reasons outside the request (not ready, "
        "queue full of other work); never for a request refused for its own size or deadline. Off: answer the error.",
    )
    moderate_output: bool = Field(
        False,
        description="Also classify non-streamed answers (output_policies) and replace unsafe ones with the refusal.",
    )
    moderate_stream: bool = Field(
        False,
        description="Also classify streamed answers (output_policies) while relaying them: text is held until judged, "
        "an unsafe answer is cut with a content_filter chunk and [DONE].",
    )
    stream_check_every_chars: int = Field(
        200,
        ge=1,
        description="moderate_stream: judge the answer each time this many new characters arrived (and at the end).",
    )
    stream_holdback_chars: int = Field(
        100,
        ge=0,
        description="moderate_stream: after a passing check, keep this many of the last judged characters back until "
        "the next check passes too (0: release everything judged).",
    )

    def inference_layout(self) -> tuple[int, int | None]:
        """(inference workers, intra-op threads of the shared session or None for one session)."""
        workers = self.inference_workers or max(1, self.threads // self.worker_threads)
        adaptive = workers > 1 and self.worker_threads != self.threads
        return workers, self.worker_threads if adaptive else None

    @field_validator("guard_policies", "output_policies", "moderation_policies", "guard_roles", mode="before")
    @classmethod
    def _env_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("guard_roles")
    @classmethod
    def _lower_roles(cls, value: list[str] | None) -> list[str] | None:
        # As service.gateway.chat_text.normalise_role reads a request's roles (config sits below the gateway).
        return None if value is None else [normalize_text(role).strip().casefold() for role in value]

    @field_validator("role_policies")
    @classmethod
    def _lower_role_keys(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {normalize_text(role).strip().casefold(): ids for role, ids in value.items()}
        if any(not role for role in out):
            raise ValueError("a role name must not be blank")
        return out

    @field_validator("api_key", "upstream_api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key (e.g. an unset shell variable) must not silently mean "no auth".
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty; leave the variable unset to disable it")
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value
