"""Merge whole state dicts: a method applied tensor by tensor over a parameter subset.

``Merger`` holds the sources' tensors (and θ_base) once and caches each method's
weight-independent half (trimmed or dropped task vectors), so one search trial costs a
weighted combination of k tensors per parameter and no disk I/O. Everything outside the
subset, and every non-float buffer, is the host's tensor itself (not a copy).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch

from training.merging.methods import weighted_average
from training.merging.params import MergeParams
from training.merging.registry import MergeMethod, get_method
from training.merging.subsets import ParameterSubset

StateDict = Mapping[str, torch.Tensor]


def tensor_seed(seed: int, name: str, source: int) -> int:
    """A stable per-(tensor, source) seed: DARE masks differ between tensors yet rebuild identically."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + source) % (2**63 - 1)


def check_compatible(states: Sequence[StateDict], host: int = 0) -> None:
    """Every source must have the host's float tensors with the same shapes: merging is per entry."""
    ref = states[host]
    for i, st in enumerate(states):
        missing = [n for n, t in ref.items() if t.is_floating_point() and n not in st]
        if missing:
            raise ValueError(f"source {i} lacks {len(missing)} tensors of the host, e.g. {missing[:3]}")
        bad = [n for n, t in ref.items() if t.is_floating_point() and tuple(st[n].shape) != tuple(t.shape)]
        if bad:
            raise ValueError(f"source {i} has other shapes for {bad[:3]} (different architectures cannot be merged)")


class Merger:
    """Merges k source state dicts with one method; ``merge(weights, subset)`` is one trial."""

    def __init__(
        self,
        states: Sequence[StateDict],
        method: MergeMethod | str,
        params: MergeParams | None = None,
        base: StateDict | None = None,
        host: int = 0,
        cache: bool = True,
    ) -> None:
        if not states:
            raise ValueError("nothing to merge")
        if not 0 <= host < len(states):
            raise ValueError(f"host {host} is not one of the {len(states)} sources")
        check_compatible(states, host)
        self.states = list(states)
        self.method = get_method(method) if isinstance(method, str) else method
        self.params = params or MergeParams()
        self.base = base
        self.host = host
        self.cache = cache
        self._prepared: dict[tuple[int, str], torch.Tensor] = {}
        # Tensors the method cannot treat as task vectors (θ_base lacks them, e.g. a head the
        # pretrained encoder never had): averaged instead, and reported.
        self.soup_fallback: list[str] = []
        if self.method.uses_base:
            if base is None:
                raise ValueError(f"merge method {self.method.name!r} needs θ_base")
            ref = self.states[host]
            self.soup_fallback = [
                n
                for n, t in ref.items()
                if t.is_floating_point() and (n not in base or tuple(base[n].shape) != tuple(t.shape))
            ]

    def _input(self, i: int, name: str) -> torch.Tensor:
        """Source i's tensor as the method's combine step wants it (raw, delta, trimmed or dropped delta)."""
        key = (i, name)
        hit = self._prepared.get(key)
        if hit is not None:
            return hit
        x = self.states[i][name]
        if self.method.uses_base:
            assert self.base is not None
            x = x.float() - self.base[name].float()
        if self.method.prepares:
            x = self.method.prepare(x, self.params, tensor_seed(self.params.seed, name, i))
        if self.cache and (self.method.uses_base or self.method.prepares):
            self._prepared[key] = x
        return x

    def merge_tensor(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """One parameter merged over the sources with non-zero weight (zero weights change nothing)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        live = [i for i in range(len(self.states)) if float(w[i]) > 0]
        if not live:
            raise ValueError("weights must not all be zero")
        host_t = self.states[self.host][name]
        if name in self.soup_fallback:
            return weighted_average([self.states[i][name] for i in live], w[live]).to(host_t.dtype)
        inputs = [self._input(i, name) for i in live]
        base_t = self.base[name].float() if (self.method.uses_base and self.base is not None) else None
        return self.method.combine(inputs, w[live], base_t, self.params).to(host_t.dtype)

    def merge(self, weights: Sequence[float] | torch.Tensor, subset: ParameterSubset) -> dict[str, torch.Tensor]:
        """A full state dict: the subset merged, everything else the host's own tensors."""
        w = torch.as_tensor(list(weights) if not isinstance(weights, torch.Tensor) else weights, dtype=torch.float32)
        if w.numel() != len(self.states):
            raise ValueError(f"{w.numel()} weights for {len(self.states)} sources")
        out: dict[str, torch.Tensor] = {}
        for name, t in self.states[self.host].items():
            if t.is_floating_point() and subset.selects(name):
                out[name] = self.merge_tensor(name, w)
            else:
                out[name] = t
        return out

    def clear_cache(self) -> None:
        self._prepared.clear()


def merge_state_dicts(
    states: Sequence[StateDict],
    weights: Sequence[float],
    *,
    method: str,
    subset: ParameterSubset,
    params: MergeParams | None = None,
    base: StateDict | None = None,
    host: int = 0,
) -> dict[str, torch.Tensor]:
    """One-shot merge without caching (export, tests); the search keeps a ``Merger`` instead."""
    return Merger(states, method, params, base=base, host=host, cache=False).merge(weights, subset)
