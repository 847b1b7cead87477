"""HTTP request and response bodies (kept apart: requests validate, responses document)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.engine import Classification, PolicyVerdict, Timings
from service.policy import POLICY_ID_PATTERN, Policy

PolicyId = Annotated[str, StringConstraints(pattern=POLICY_ID_PATTERN)]


class ClassifyRequest(BaseModel):
    """Exactly one of ``policy_id`` (served policy id or list of ids) or ``policy`` (inline)."""

    model_config = ConfigDict(extra="forbid")

    policy_id: PolicyId | list[PolicyId] | None = Field(None, description="Served policy id, or a list of ids.")
    policy: Policy | None = Field(None, description="An inline policy, scored zero-shot unless the model knows it.")
    prompt: str = Field(description="Text to judge. Long prompts are scored window by window, never truncated.")

    @model_validator(mode="after")
    def _one_policy_source(self) -> "ClassifyRequest":
        if (self.policy_id is None) == (self.policy is None):
            raise ValueError("give exactly one of policy_id or policy")
        return self


class LatencyMs(BaseModel):
    queue: float
    tokenize: float
    inference: float
    total: float

    @classmethod
    def of(cls, t: Timings) -> "LatencyMs":
        return cls(queue=round(t.queue_ms, 3), tokenize=round(t.tokenize_ms, 3), inference=round(t.inference_ms, 3), total=round(t.total_ms, 3))


class VerdictOut(BaseModel):
    policy_id: str
    verdict: Literal["safe", "unsafe"]
    unsafe: bool
    score: float = Field(description="Highest unsafe probability over the prompt's windows.")
    threshold: float
    windows: int = Field(description="Model windows the prompt was split into.")

    @classmethod
    def of(cls, v: PolicyVerdict) -> "VerdictOut":
        return cls(policy_id=v.policy_id, verdict=v.verdict, unsafe=v.unsafe, score=v.score, threshold=v.threshold, windows=v.windows)  # type: ignore[arg-type]


class ClassifyResponse(VerdictOut):
    """Answer for a single policy."""

    model: str = Field(description="name@version of the answering model.")
    latency_ms: LatencyMs

    @classmethod
    def from_classification(cls, c: Classification) -> "ClassifyResponse":
        return cls(**VerdictOut.of(c.verdicts[0]).model_dump(), model=c.model, latency_ms=LatencyMs.of(c.timings))


class ClassifyManyResponse(BaseModel):
    """Answer for a list of policy ids: one verdict each, ``unsafe`` if any is."""

    results: list[VerdictOut]
    unsafe: bool
    model: str
    latency_ms: LatencyMs

    @classmethod
    def from_classification(cls, c: Classification) -> "ClassifyManyResponse":
        return cls(results=[VerdictOut.of(v) for v in c.verdicts], unsafe=c.unsafe, model=c.model, latency_ms=LatencyMs.of(c.timings))


class PolicyOut(BaseModel):
    id: str
    name: str
    description: str
    allowed: list[str]
    disallowed: list[str]
    threshold: float
    trained: bool = Field(description="The model was trained and calibrated on this exact description.")


class PoliciesResponse(BaseModel):
    model: str
    policies: list[PolicyOut]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
