"""A merge recipe: everything needed to rebuild a merged model from its sources (what the manifest records).

Validated here, so an unknown method or negative weights from a CLI or a trial log fail
with a readable message before any tensor is touched.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.merging.params import MergeParams
from training.merging.registry import METHODS


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
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(sorted(METHODS))}")
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
    def _host_in_range(self) -> MergeRecipe:
        if self.host >= len(self.weights):
            raise ValueError(f"host {self.host} is not one of the {len(self.weights)} sources")
        return self
