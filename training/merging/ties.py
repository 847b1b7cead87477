"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean of task vectors.

Trimming and the sign mask are peft's tensor utilities; what peft does not provide is the
*weighted* disjoint mean: peft divides the agreeing weighted deltas by how many models agree,
which is a mean only when every weight is 1. A search over convex weights needs the mean
weighted by the agreeing models' weights (as mergekit normalises it), otherwise a vector of
weights summing to 1 would also shrink the task vector by the number of models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, prune

from training.merging.config import MergeParams
from training.merging.registry import MergeMethod, normalise_weights, register, weights_like


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by |value|, zero the rest (identity at 1)."""
    if density >= 1.0:
        return delta  # peft warns on density 1; nothing to trim
    return prune(delta, density, method="magnitude")


def sign_consensus_mean(deltas: Sequence[torch.Tensor], weights: torch.Tensor, majority_sign: str = "total") -> torch.Tensor:
    """Elect a sign per entry from the weighted deltas, then average only the agreeing values.

    Entries that are zero (trimmed or dropped) never vote and never count in the mean; an
    entry where no model agrees with the elected sign stays 0 (θ_base).
    """
    w = normalise_weights(weights)
    stacked = torch.stack([d.float() for d in deltas])
    w_b = weights_like(w, stacked)
    weighted = stacked * w_b
    agree = calculate_majority_sign_mask(weighted, method=majority_sign)  # False where the value is 0
    numerator = (weighted * agree).sum(0)
    denominator = (w_b * agree).sum(0)
    out = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), torch.zeros_like(numerator))
    return out.to(deltas[0].dtype)


def _prepare(delta: torch.Tensor, params: MergeParams, seed: int | None) -> torch.Tensor:
    return trim_by_magnitude(delta, params.density)


def _combine(deltas: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams) -> torch.Tensor:
    assert base is not None
    return base + params.lam * sign_consensus_mean(deltas, weights, params.majority_sign).to(base.dtype)


TIES = register(MergeMethod(name="ties", prepare=_prepare, combine=_combine, uses_base=True,
                            summary="trim task vectors by magnitude, elect sign, weighted disjoint mean"))
