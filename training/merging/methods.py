"""Merge methods as pure functions over tensors: generalised task arithmetic and SLERP.

Task arithmetic merges task vectors ``τ_i = θ_i − θ_base`` as ``θ_base + λ·combine(sparsify(τ_i))``.
Two choices make the family:

- **sparsify** each task vector: ``none``; ``trim`` (TIES, Yadav et al., 2023: keep the top
  ``density`` fraction by magnitude); ``drop`` (DARE, Yu et al., 2024: zero each entry with
  probability p, rescale survivors by 1/(1−p)).
- **consensus** over the sparse vectors: ``linear`` (weighted sum) or ``ties`` (elect a sign
  per entry, then the mean of the agreeing entries weighted by their models' weights).

TIES = trim × ties, DARE-linear = drop × linear, DARE-TIES = drop × ties. The soup (weighted
average of raw parameters) needs no θ_base and is the fallback for tensors θ_base lacks;
SLERP interpolates the two highest-weighted models along the great circle.

Trimming, random pruning and the sign mask are peft's tensor utilities. What peft does not
provide is the *weighted* disjoint mean: peft divides the agreeing weighted deltas by how
many models agree, a mean only when every weight is 1; a search over convex weights needs
the mean weighted by the agreeing models' weights (as mergekit normalises it). peft draws
its random masks from torch's global generator, so a seeded drop runs inside a forked RNG:
the same recipe rebuilds the same model and a merge never disturbs the caller's random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, prune

Sparsify = Literal["none", "trim", "drop"]
Consensus = Literal["linear", "ties"]
DEFAULT_DOT_THRESHOLD = 0.9995


def normalise_weights(weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Non-negative weights scaled to sum to 1 (every method here expects a convex combination)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError("weights must be a non-empty vector")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return w / total


def weights_like(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Weights shaped [n, 1, 1, ...] to broadcast over a stack of n tensors."""
    return weights.to(stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i x_i in float32 with weights normalised to sum to 1, returned in the inputs' dtype (the soup)."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    w = normalise_weights(weights)
    stacked = torch.stack([t.float() for t in tensors])
    return (stacked * weights_like(w, stacked)).sum(0).to(tensors[0].dtype)


# -- sparsify -----------------------------------------------------------------------------------


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by |value|, zero the rest (identity at 1)."""
    if density >= 1.0:
        return delta  # peft warns on density 1; nothing to trim
    return prune(delta, density, method="magnitude")


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


def sparsify(
    delta: torch.Tensor, kind: Sparsify, *, density: float = 1.0, drop_rate: float = 0.0, seed: int | None = None
) -> torch.Tensor:
    """One task vector made sparse; the weight-independent half of a merge (cached by the search)."""
    if kind == "trim":
        return trim_by_magnitude(delta, density)
    if kind == "drop":
        return drop_and_rescale(delta, drop_rate, seed)
    return delta


# -- consensus ----------------------------------------------------------------------------------


def sign_consensus_mean(
    deltas: Sequence[torch.Tensor], weights: torch.Tensor, majority_sign: str = "total"
) -> torch.Tensor:
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


def combine_task_vectors(
    deltas: Sequence[torch.Tensor],
    weights: torch.Tensor,
    base: torch.Tensor,
    consensus: Consensus,
    *,
    lam: float = 1.0,
    majority_sign: str = "total",
) -> torch.Tensor:
    """θ_base + λ · (weighted sum | sign-consensus mean) of the (sparse) task vectors."""
    merged = (
        weighted_average(deltas, weights)
        if consensus == "linear"
        else sign_consensus_mean(deltas, weights, majority_sign)
    )
    return base + lam * merged.to(base.dtype)


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    base: torch.Tensor,
    *,
    sparsify_kind: Sparsify = "none",
    consensus: Consensus = "linear",
    density: float = 1.0,
    drop_rate: float = 0.0,
    lam: float = 1.0,
    majority_sign: str = "total",
    seed: int | None = None,
) -> torch.Tensor:
    """Generalised task arithmetic on one tensor per model (seed + i seeds model i's drop mask)."""
    deltas = [
        sparsify(t - base, sparsify_kind, density=density, drop_rate=drop_rate, seed=None if seed is None else seed + i)
        for i, t in enumerate(tensors)
    ]
    return combine_task_vectors(deltas, weights, base, consensus, lam=lam, majority_sign=majority_sign)


# -- SLERP --------------------------------------------------------------------------------------


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1.0 - t) * a.float() + t * b.float()).to(a.dtype)


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DEFAULT_DOT_THRESHOLD, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), treating each tensor as one vector.

    Linear interpolation of two distant weight vectors shrinks the result toward the origin;
    the great circle keeps the norm when the endpoints have equal norms. Fine-tunes of one
    encoder are often almost collinear, where the formula divides by sin Ω ≈ 0: there it
    falls back to lerp, which is then the same thing to within rounding.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    if na < eps or nb < eps:
        return lerp(a, b, t)  # a zero vector has no direction
    dot = float((a64 / na) @ (b64 / nb))
    if abs(dot) > dot_threshold:
        return lerp(a, b, t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    out = (math.sin((1.0 - t) * omega) / s) * a64 + (math.sin(t * omega) / s) * b64
    return out.view(a.shape).to(a.dtype)


def pair_and_t(weights: torch.Tensor) -> tuple[int, int, float]:
    """The two sources SLERP interpolates (a < b) and t = w_b / (w_a + w_b), from weights over k sources.

    The two largest weights (ties to the earlier model), in source order, so one-hot weights
    return that model exactly.
    """
    w = normalise_weights(weights)
    if w.numel() == 1:
        return 0, 0, 0.0
    order = sorted(range(w.numel()), key=lambda i: (-float(w[i]), i))
    a, b = sorted(order[:2])
    wa, wb = float(w[a]), float(w[b])
    return a, b, wb / (wa + wb)


def slerp_weighted(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, dot_threshold: float = DEFAULT_DOT_THRESHOLD
) -> torch.Tensor:
    """SLERP of the two highest-weighted of k tensors."""
    a, b, t = pair_and_t(weights)
    return slerp(tensors[a], tensors[b], t, dot_threshold)
