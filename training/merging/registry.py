"""The merge methods by name: a static table over the pure functions of ``methods``.

A method is split in two because the expensive, weight-independent half (trimming or
randomly dropping a task vector) does not change between search trials: the search calls
``prepare`` once per model and tensor and only ``combine`` with each new weight vector.
The table is static (no self-registration on import), so nothing imports this module back:
the search, the CLI and the manifest refer to a method by a stable string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from training.merging.methods import (
    Consensus,
    Sparsify,
    combine_task_vectors,
    slerp_weighted,
    sparsify,
    weighted_average,
)
from training.merging.params import MergeParams

Kind = Literal["soup", "task_arithmetic", "slerp"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: a kind, and for task arithmetic its sparsify × consensus pair.

    ``uses_base``: the method works on task vectors (θ_i − θ_base): ``prepare`` receives the
    delta and ``combine`` returns θ_base + merged delta. Otherwise both see raw parameters.
    ``random``: ``prepare`` draws random numbers (DARE); ``seed`` makes the draw repeatable.
    """

    name: str
    kind: Kind
    sparsify: Sparsify = "none"
    consensus: Consensus = "linear"
    summary: str = ""

    @property
    def uses_base(self) -> bool:
        return self.kind == "task_arithmetic"

    @property
    def random(self) -> bool:
        return self.sparsify == "drop"

    @property
    def prepares(self) -> bool:
        """Whether ``prepare`` changes its input (worth caching per tensor)."""
        return self.sparsify != "none"

    def prepare(self, delta: torch.Tensor, params: MergeParams, seed: int | None) -> torch.Tensor:
        return sparsify(delta, self.sparsify, density=params.density, drop_rate=params.drop_rate, seed=seed)

    def combine(
        self, inputs: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None, params: MergeParams
    ) -> torch.Tensor:
        if self.kind == "soup":
            return weighted_average(inputs, weights)
        if self.kind == "slerp":
            return slerp_weighted(inputs, weights, params.slerp_dot_threshold)
        if base is None:
            raise ValueError(f"merge method {self.name!r} needs a base tensor (task vectors are θ_i − θ_base)")
        return combine_task_vectors(
            inputs, weights, base, self.consensus, lam=params.lam, majority_sign=params.majority_sign
        )

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        weights: torch.Tensor,
        base: torch.Tensor | None,
        params: MergeParams,
        seed: int | None = None,
    ) -> torch.Tensor:
        """prepare + combine on one tensor per model: the pure function the tests pin down."""
        if self.uses_base:
            if base is None:
                raise ValueError(f"merge method {self.name!r} needs a base tensor (task vectors are θ_i − θ_base)")
            inputs = [t - base for t in tensors]
        else:
            inputs = list(tensors)
        if self.prepares:
            inputs = [self.prepare(x, params, None if seed is None else seed + i) for i, x in enumerate(inputs)]
        return self.combine(inputs, weights, base if self.uses_base else None, params)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("soup", "soup", summary="weighted average of parameters"),
        MergeMethod(
            "ties",
            "task_arithmetic",
            sparsify="trim",
            consensus="ties",
            summary="trim task vectors by magnitude, elect sign, weighted disjoint mean",
        ),
        MergeMethod(
            "dare_linear",
            "task_arithmetic",
            sparsify="drop",
            consensus="linear",
            summary="random drop + rescale, weighted sum of task vectors",
        ),
        MergeMethod(
            "dare_ties",
            "task_arithmetic",
            sparsify="drop",
            consensus="ties",
            summary="random drop + rescale, TIES sign election and disjoint mean",
        ),
        MergeMethod("slerp", "slerp", summary="spherical interpolation of the two highest-weighted models"),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    return list(METHODS)
