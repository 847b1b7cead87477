"""The search space of model-merging search (MMS): a weight simplex over k models × categorical choices.

A strategy sees only this: how many weights, which categories (the merge ``type`` = parameter
subset, and ``instruction`` when the top-k models were trained with different instruction
texts) and their options. It never sees a tensor, so strategies are tested on synthetic
rewards in microseconds and reused for any model family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Proposal:
    """One point of the space: convex weights over the k sources and one option per category."""

    weights: tuple[float, ...]
    choices: Mapping[str, str] = field(default_factory=dict)

    def choice(self, category: str) -> str:
        return self.choices[category]

    def to_json(self) -> dict:
        return {"weights": [round(float(w), 6) for w in self.weights], "choices": dict(self.choices)}

    @classmethod
    def from_json(cls, data: Mapping) -> Proposal:
        return cls(tuple(float(w) for w in data["weights"]), dict(data.get("choices", {})))


@dataclass(frozen=True)
class SearchSpace:
    n_weights: int
    categories: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.n_weights < 1:
            raise ValueError("the search needs at least one model")
        for name, options in self.categories.items():
            if not options:
                raise ValueError(f"category {name!r} has no options")
            if len(set(options)) != len(options):
                raise ValueError(f"category {name!r} repeats an option: {options}")

    def check(self, p: Proposal) -> Proposal:
        """Reject a proposal from another space (e.g. a log written for other checkpoints)."""
        if len(p.weights) != self.n_weights:
            raise ValueError(f"{len(p.weights)} weights for a space of {self.n_weights} models")
        w = np.asarray(p.weights, dtype=float)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights {list(p.weights)} are not a point of the simplex")
        if set(p.choices) != set(self.categories):
            raise ValueError(f"choices {sorted(p.choices)} do not match categories {sorted(self.categories)}")
        for name, value in p.choices.items():
            if value not in self.categories[name]:
                raise ValueError(f"{name}={value!r} is not one of {self.categories[name]}")
        return p

    def normalise(self, weights: np.ndarray) -> tuple[float, ...]:
        w = np.clip(np.asarray(weights, dtype=float), 0.0, None)
        total = w.sum()
        w = np.full(self.n_weights, 1.0 / self.n_weights) if total <= 0 or not np.isfinite(total) else w / total
        return tuple(float(x) for x in w)

    def uniform_choices(self, rng: np.random.Generator) -> dict[str, str]:
        return {name: options[int(rng.integers(len(options)))] for name, options in self.categories.items()}
