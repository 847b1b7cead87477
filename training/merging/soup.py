"""Weighted model soup (MSA): θ = Σ w_i θ_i with Σ w_i = 1.

The simplest merge and the fallback for tensors that have no θ_base (a classification head
that the pretrained encoder never had): averaging raw parameters needs no task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.merging.config import MergeParams
from training.merging.registry import MergeMethod, normalise_weights, register, weights_like


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i x_i in float32 with weights normalised to sum to 1, returned in the inputs' dtype."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    w = normalise_weights(weights)
    stacked = torch.stack([t.float() for t in tensors])
    return (stacked * weights_like(w, stacked)).sum(0).to(tensors[0].dtype)


def _combine(tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams) -> torch.Tensor:
    return weighted_average(tensors, weights)


SOUP = register(MergeMethod(name="soup", combine=_combine, summary="weighted average of parameters"))
