"""Method hyper-parameters: the edge where numbers from a CLI or a log become validated settings.

Tensor functions trust their inputs; everything a user or a log file can get wrong (a
density of 3, a negative drop rate) is rejected here with a readable message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeParams(BaseModel):
    """Method hyper-parameters that stay fixed during one search (the search varies weights and subset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    density: float = Field(0.5, gt=0.0, le=1.0, description="TIES: fraction of each task vector kept by magnitude.")
    drop_rate: float = Field(
        0.5, ge=0.0, lt=1.0, description="DARE: probability p of dropping each delta (survivors x 1/(1-p))."
    )
    lam: float = Field(1.0, gt=0.0, le=4.0, description="Task-vector scale λ: θ = θ_base + λ·τ.")
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="TIES sign election: by summed mass or by count."
    )
    slerp_dot_threshold: float = Field(0.9995, gt=0.0, lt=1.0, description="SLERP falls back to lerp above this |cos|.")
    seed: int = Field(0, ge=0, description="DARE drop masks: the same seed gives the same merged model.")
