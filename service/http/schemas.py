"""HTTP request and response bodies (kept apart: requests validate, responses document)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.contract.policy import POLICY_ID_PATTERN, Policy
from service.core.engine import Classification, PolicyVerdict, ThresholdSource, Timings, Verdict
from service.core.errors import ErrorCode
from service.model.manifest import Sensitivity

PolicyId = Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)]


class ClassifyRequest(BaseModel):
    """Exactly one of ``policy_id`` (served policy id or list of ids) or ``policy`` (inline)."""

    model_config = ConfigDict(
        extra="forbid",
        # What _one_policy_source enforces, for clients and fuzzers reading the schema.
        json_schema_extra={
            "oneOf": [
                {"required": ["policy_id"], "properties": {"policy_id": {"not": {"type": "null"}}}},
                {"required": ["policy"], "properties": {"policy": {"not": {"type": "null"}}}},
            ]
        },
    )

    policy_id: PolicyId | Annotated[list[PolicyId], Field(min_length=1)] | None = Field(
        None, description="Served policy id, or a list of ids."
    )
    policy: Policy | None = Field(None, description="An inline policy, scored zero-shot unless the model knows it.")
    prompt: str = Field(
        description="Text to judge. Long prompts are scored window by window, never truncated. "
        "A prompt without a non-blank character answers 422 empty_prompt; one over UNIGUARD_MAX_PROMPT_CHARS 413 "
        "prompt_too_long.",
        # Documented for clients and fuzzers; enforced by the engine with its own error codes.
        # The pattern (ECMA-262, whose \s includes U+FEFF) is "a character Python's str.strip() keeps
        # and that is not U+FEFF": the engine's own definition of a non-blank prompt.
        json_schema_extra={"minLength": 1, "pattern": r"[^\s\x1c-\x1f\x85]"},
    )

    sensitivity: Sensitivity | None = Field(
        None,
        description="Operating point: strict (flags most), balanced or permissive (flags fewest); each served "
        "policy's threshold per level is in GET /v1/policies. Default: UNIGUARD_SENSITIVITY (balanced).",
    )

    @model_validator(mode="after")
    def _one_policy_source(self) -> ClassifyRequest:
        if (self.policy_id is None) == (self.policy is None):
            raise ValueError("give exactly one of policy_id or policy")
        return self


class LatencyMs(BaseModel):
    queue: float
    tokenize: float
    inference: float
    total: float

    @classmethod
    def of(cls, t: Timings) -> LatencyMs:
        return cls(
            queue=round(t.queue_ms, 3),
            tokenize=round(t.tokenize_ms, 3),
            inference=round(t.inference_ms, 3),
            total=round(t.total_ms, 3),
        )


class VerdictOut(BaseModel):
    policy_id: str
    verdict: Verdict
    unsafe: bool
    score: float = Field(description="Highest unsafe probability over the prompt's windows.")
    threshold: float
    windows: int = Field(description="Model windows the prompt was split into.")

    @classmethod
    def of(cls, v: PolicyVerdict) -> VerdictOut:
        return cls(
            policy_id=v.policy_id,
            verdict=v.verdict,
            unsafe=v.unsafe,
            score=v.score,
            threshold=v.threshold,
            windows=v.windows,
        )


class ClassifyResponse(VerdictOut):
    """Answer for a single policy."""

    model: str = Field(description="name@version of the answering model.")
    sensitivity: Sensitivity = Field(description="The level whose threshold decided the verdict.")
    latency_ms: LatencyMs

    @classmethod
    def from_classification(cls, c: Classification, sensitivity: Sensitivity) -> ClassifyResponse:
        return cls(
            **VerdictOut.of(c.verdicts[0]).model_dump(),
            model=c.model,
            sensitivity=sensitivity,
            latency_ms=LatencyMs.of(c.timings),
        )


class ClassifyManyResponse(BaseModel):
    """Answer for a list of policy ids: one verdict each, ``unsafe`` if any is."""

    results: list[VerdictOut]
    unsafe: bool
    model: str
    sensitivity: Sensitivity = Field(description="The level whose thresholds decided the verdicts.")
    latency_ms: LatencyMs

    @classmethod
    def from_classification(cls, c: Classification, sensitivity: Sensitivity) -> ClassifyManyResponse:
        return cls(
            results=[VerdictOut.of(v) for v in c.verdicts],
            unsafe=c.unsafe,
            model=c.model,
            sensitivity=sensitivity,
            latency_ms=LatencyMs.of(c.timings),
        )


class PolicyOut(BaseModel):
    id: str
    name: str
    description: str
    allowed: list[str]
    disallowed: list[str]
    threshold: float = Field(description="The threshold at the service's default sensitivity (UNIGUARD_SENSITIVITY).")
    sensitivity: Sensitivity = Field(description="The level `threshold` belongs to.")
    thresholds: dict[Sensitivity, float] = Field(
        description="The threshold at each sensitivity level (one value at every level for a config override or an "
        "untrained policy)."
    )
    trained: bool = Field(description="The model was trained and calibrated on this exact description.")
    threshold_source: ThresholdSource = Field(
        description="config: UNIGUARD_THRESHOLDS; manifest: chosen on validation data; default: zero-shot default."
    )


class PoliciesResponse(BaseModel):
    model: str
    policies: list[PolicyOut]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str


class ErrorInfo(BaseModel):
    code: ErrorCode = Field(description="Stable error code; clients switch on it.")
    message: str = Field(description="What went wrong, for humans.")
    details: Any = Field(
        None, description="Small JSON value with specifics (limits, unknown ids, validation errors), or null."
    )


class ErrorResponse(BaseModel):
    """The body of every error answer, whatever the route or status."""

    error: ErrorInfo


class ReloadResponse(BaseModel):
    """Outcome of a successful hot reload."""

    status: Literal["reloaded"] = "reloaded"
    model: str = Field(description="name@version now serving.")
    previous_model: str | None = Field(description="name@version that served before (None if nothing did).")
    policies: list[str]
    warnings: list[str] = Field(
        description="Problems that do not stop serving (a policy too long for the window, unknown threshold overrides)."
    )
    elapsed_ms: float
