"""Validated merge settings: the edge where strings and numbers from a CLI or a log become a recipe.

Tensor functions trust their inputs; everything a user or a log file can get wrong (an
unknown method, negative weights, a density of 3) is rejected here with a readable message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class MergeParams(BaseModel):
    """Method hyper-parameters that stay fixed during one search (the search varies weights and subset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    density: float = Field(0.5, gt=0.0, le=1.0, description="TIES: fraction of each task vector kept by magnitude.")
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="DARE: probability p of dropping each delta (survivors x 1/(1-p)).")
    lam: float = Field(1.0, gt=0.0, le=4.0, description="Task-vector scale λ: θ = θ_base + λ·τ.")
    majority_sign: Literal["total", "frequency"] = Field("total", description="TIES sign election: by summed mass or by count.")
    slerp_dot_threshold: float = Field(0.9995, gt=0.0, lt=1.0, description="SLERP falls back to lerp above this |cos|.")
    seed: int = Field(0, ge=0, description="DARE drop masks: the same seed gives the same merged model.")


class MergeRecipe(BaseModel):
    """Everything needed to rebuild a merged model from its sources: what the manifest records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    subset: str = "all"
    weights: tuple[float, ...]
    params: MergeParams = Field(default_factory=MergeParams)
    host: int = Field(0, ge=0, description="Source whose tensors fill everything outside the subset (top-1).")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from training.merging.registry import get_method

        try:
            get_method(v)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return v

    @field_validator("weights")
    @classmethod
    def _convex(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("weights must not be empty")
        if any(w < 0 or w != w for w in v):
            raise ValueError(f"weights must be non-negative numbers, got {list(v)}")
        total = sum(v)
        if total <= 0:
            raise ValueError("weights must not all be zero")
        return tuple(w / total for w in v)

    @model_validator(mode="after")
    def _host_in_range(self) -> "MergeRecipe":
        if self.host >= len(self.weights):
            raise ValueError(f"host {self.host} is not one of the {len(self.weights)} sources")
        return self
