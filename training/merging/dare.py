"""DARE (Yu et al., 2024): drop each delta with probability p, rescale survivors by 1/(1−p).

Dropping uses peft's random pruning (Bernoulli keep mask, rescaled so the expected delta is
unchanged). peft draws from torch's global generator, so the draw runs inside a forked RNG
seeded per (seed, tensor, model): the same recipe rebuilds the same model, and a merge never
disturbs the random state of the code around it. Two combinations: linear (weighted sum of
the sparse deltas) and TIES (sign election + weighted disjoint mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.utils.merge_utils import prune

from training.merging.config import MergeParams
from training.merging.registry import MergeMethod, register
from training.merging.soup import weighted_average
from training.merging.ties import sign_consensus_mean


def drop_and_rescale(delta: torch.Tensor, drop_rate: float, seed: int | None = None) -> torch.Tensor:
    """Zero each entry with probability ``drop_rate`` and divide survivors by 1 − drop_rate (p=0: identity)."""
    if drop_rate <= 0.0:
        return delta
    if not 0.0 < drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if seed is None:
        return prune(delta, 1.0 - drop_rate, method="random", rescale=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return prune(delta, 1.0 - drop_rate, method="random", rescale=True)


def _prepare(delta: torch.Tensor, params: MergeParams, seed: int | None) -> torch.Tensor:
    return drop_and_rescale(delta, params.drop_rate, seed)


def _combine_linear(deltas: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams) -> torch.Tensor:
    assert base is not None
    return base + params.lam * weighted_average(deltas, weights).to(base.dtype)


def _combine_ties(deltas: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams) -> torch.Tensor:
    assert base is not None
    return base + params.lam * sign_consensus_mean(deltas, weights, params.majority_sign).to(base.dtype)


DARE_LINEAR = register(MergeMethod(name="dare_linear", prepare=_prepare, combine=_combine_linear, uses_base=True, random=True,
                                   summary="random drop + rescale, weighted sum of task vectors"))
DARE_TIES = register(MergeMethod(name="dare_ties", prepare=_prepare, combine=_combine_ties, uses_base=True, random=True,
                                 summary="random drop + rescale, TIES sign election and disjoint mean"))
