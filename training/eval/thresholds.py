"""Per-policy thresholds for a stated target, every source weighted equally.

``best-f1`` (highest F1) or ``max-fpr:X`` (the lowest threshold whose false-positive rate on
the policy's safe rows is at most X). Sources are weighted equally so that a large source
(long jailbreak dumps, Alpaca) does not set a policy's threshold alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from training.data.rows import Example
from training.eval.metrics import rows_by_policy, source_groups, source_weights


@dataclass(frozen=True)
class ThresholdTarget:
    """``levels`` (held-out sensitivity levels), ``best-f1`` or ``max-fpr:0.05`` (a false-positive rate)."""

    kind: str = "best_f1"
    max_fpr: float | None = None

    @classmethod
    def parse(cls, text: str) -> ThresholdTarget:
        t = text.strip().lower().replace("_", "-")
        if t in ("best-f1", "f1"):
            return cls("best_f1")
        if t == "levels":
            return cls("levels")
        if t.startswith("max-fpr:"):
            value = float(t.split(":", 1)[1])
            if not 0.0 <= value < 1.0:
                raise ValueError(f"max-fpr must be in [0, 1): {value}")
            return cls("max_fpr", value)
        raise ValueError(f"unknown threshold target {text!r}: use levels, best-f1 or max-fpr:<rate>, e.g. max-fpr:0.05")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind} if self.max_fpr is None else {"kind": self.kind, "max_fpr": self.max_fpr}

    def describe(self) -> str:
        if self.kind == "best_f1":
            return "the highest F1"
        if self.kind == "levels":
            return "the best held-out balanced score under each sensitivity level's benign FPR caps"
        return f"the lowest threshold whose false-positive rate is at most {self.max_fpr:g}"


BEST_F1 = ThresholdTarget()


def best_f1_threshold(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, default: float = 0.5
) -> float:
    """Threshold that maximises (weighted) F1; ``default`` when one class is missing."""
    labels = np.asarray(labels, dtype=int)
    if labels.min(initial=1) == labels.max(initial=0):
        return default
    precision, recall, thresholds = precision_recall_curve(labels, scores, sample_weight=weights)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point has no threshold
    # Midpoint to the next lower score generalises better than sitting exactly on a sample.
    t = float(thresholds[best])
    lower = np.asarray(scores)[np.asarray(scores) < t]
    if lower.size:
        t = (t + float(lower.max())) / 2
    return float(np.clip(t, 1e-4, 1 - 1e-4))


def max_fpr_threshold(
    labels: np.ndarray, scores: np.ndarray, max_fpr: float, weights: np.ndarray | None = None, default: float = 0.5
) -> float:
    """Lowest threshold (score >= t is unsafe) with weighted FPR <= max_fpr, placed midway to
    the next lower score; ``default`` when the policy has no safe rows."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    neg = labels == 0
    if not neg.any():
        return default
    neg_total = w[neg].sum()
    best = 1.0 - 1e-4
    for t in np.unique(scores):  # ascending
        if w[neg & (scores >= t)].sum() / neg_total <= max_fpr + 1e-12:
            best = float(t)
            break
    lower = scores[scores < best]
    if lower.size:
        best = (best + float(lower.max())) / 2
    return float(np.clip(best, 1e-4, 1 - 1e-4))


def threshold_for(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None, target: ThresholdTarget, default: float = 0.5
) -> float:
    if target.kind in ("best_f1", "levels"):  # levels: best F1 on validation until held-out rows decide
        return best_f1_threshold(labels, scores, weights, default=default)
    if target.max_fpr is None:
        raise ValueError("a max_fpr target needs a rate")
    return max_fpr_threshold(labels, scores, target.max_fpr, weights, default=default)


def choose_thresholds(
    examples: list[Example], scores: np.ndarray, target: ThresholdTarget = BEST_F1, default: float = 0.5
) -> dict[str, float]:
    """Per policy, for ``target``, sources weighted equally (lent benign:/cross: rows pooled per kind)."""
    groups = source_groups(examples)
    out = {}
    for pid, idx in rows_by_policy(examples).items():
        labels = np.array([examples[i].label for i in idx])
        weights = source_weights([groups[i] for i in idx])
        out[pid] = threshold_for(labels, scores[idx], weights, target, default)
    return out
