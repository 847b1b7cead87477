"""SLERP: spherical interpolation per tensor between two models.

Linear interpolation of two distant weight vectors shrinks the result toward the origin
(its norm drops by up to cos(Ω/2)); interpolating along the great circle keeps the norm
when the endpoints have equal norms. Fine-tunes of one encoder are often almost collinear,
where the spherical formula divides by sin Ω ≈ 0: there it falls back to lerp, which is
then the same thing to within rounding.

The search proposes a weight vector over k models; SLERP takes the two largest weights
(ties to the earlier model), keeps them in source order a < b and uses t = w_b / (w_a + w_b),
so one-hot weights return that model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from training.merging.config import MergeParams
from training.merging.registry import MergeMethod, normalise_weights, register

DEFAULT_DOT_THRESHOLD = 0.9995


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1.0 - t) * a.float() + t * b.float()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DEFAULT_DOT_THRESHOLD, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), treating each tensor as one vector."""
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
    """The two sources SLERP interpolates (a < b) and t, from a weight vector over k sources."""
    w = normalise_weights(weights)
    if w.numel() == 1:
        return 0, 0, 0.0
    order = sorted(range(w.numel()), key=lambda i: (-float(w[i]), i))
    a, b = sorted(order[:2])
    wa, wb = float(w[a]), float(w[b])
    return a, b, wb / (wa + wb)


def _combine(tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams) -> torch.Tensor:
    a, b, t = pair_and_t(weights)
    return slerp(tensors[a], tensors[b], t, params.slerp_dot_threshold)


SLERP = register(MergeMethod(name="slerp", combine=_combine, summary="spherical interpolation of the two highest-weighted models"))
