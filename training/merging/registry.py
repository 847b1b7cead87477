"""The merge-method registry: a name -> (prepare, combine) pair of pure tensor functions.

A merge method is split in two because the expensive, weight-independent half (trimming or
randomly dropping a task vector) does not change between search trials: the search calls
``prepare`` once per model and tensor and only ``combine`` with each new weight vector.
Methods register themselves by name, like mergekit's merge methods, so the search, the
CLI and the manifest refer to a method by a stable string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from training.merging.config import MergeParams

# prepare(delta_or_tensor, params, seed) -> tensor; the same for every weight vector.
PrepareFn = Callable[["torch.Tensor", "MergeParams", "int | None"], "torch.Tensor"]
# combine(prepared tensors, weights summing to 1, base tensor or None, params) -> merged tensor.
CombineFn = Callable[[Sequence["torch.Tensor"], "torch.Tensor", "torch.Tensor | None", "MergeParams"], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    ``uses_base``: the method works on task vectors (θ_i − θ_base): ``prepare`` receives the
    delta and ``combine`` returns θ_base + merged delta. Otherwise both see raw parameters.
    ``random``: ``prepare`` draws random numbers (DARE); ``seed`` makes the draw repeatable.
    """

    name: str
    combine: CombineFn
    prepare: PrepareFn | None = None
    uses_base: bool = False
    random: bool = False
    summary: str = ""

    def merge(self, tensors: Sequence["torch.Tensor"], weights: "torch.Tensor", base: "torch.Tensor | None",
              params: "MergeParams", seed: int | None = None) -> "torch.Tensor":
        """prepare + combine on one tensor per model: the pure function the tests pin down."""
        if self.uses_base:
            if base is None:
                raise ValueError(f"merge method {self.name!r} needs a base tensor (task vectors are θ_i − θ_base)")
            inputs = [t - base for t in tensors]
        else:
            inputs = list(tensors)
        if self.prepare is not None:
            inputs = [self.prepare(x, params, None if seed is None else seed + i) for i, x in enumerate(inputs)]
        return self.combine(inputs, weights, base if self.uses_base else None, params)


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    # Importing the method modules registers them; done lazily so registry.py stays import-light.
    from training.merging import dare, slerp, soup, ties  # noqa: F401


def get_method(name: str) -> MergeMethod:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    _load_builtin()
    return list(_METHODS)


def normalise_weights(weights: "torch.Tensor") -> "torch.Tensor":
    """Non-negative weights scaled to sum to 1 (every method here expects a convex combination)."""
    import torch

    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError("weights must be a non-empty vector")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return w / total


def weights_like(weights: "torch.Tensor", stacked: "torch.Tensor") -> "torch.Tensor":
    """Weights shaped [n, 1, 1, ...] to broadcast over a stack of n tensors."""
    return weights.to(stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
