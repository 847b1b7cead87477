"""Binary guardrail metrics (unsafe = positive) and source-balanced threshold choice."""

from __future__ import annotations

from collections import Counter

import numpy as np


def binary_scores(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Precision, recall, F1, FPR, accuracy and ROC-AUC at one threshold (None where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    labels = np.asarray(labels, dtype=int)
    pred = (np.asarray(scores) >= threshold).astype(int)
    n_pos = int(labels.sum())
    n_neg = int(len(labels) - n_pos)
    out: dict[str, float | int | None] = {"n": int(len(labels)), "unsafe": n_pos}
    if n_pos:
        p, r, f, _ = precision_recall_fscore_support(labels, pred, average="binary", pos_label=1, zero_division=0)
        out.update(precision=round(float(p), 4), recall=round(float(r), 4), f1=round(float(f), 4))
    else:
        out.update(precision=None, recall=None, f1=None)
    out["fpr"] = round(float(((pred == 1) & (labels == 0)).sum() / n_neg), 4) if n_neg else None
    out["accuracy"] = round(float((pred == labels).mean()), 4) if len(labels) else None
    out["roc_auc"] = round(float(roc_auc_score(labels, scores)), 4) if n_pos and n_neg else None
    return out


def source_weights(sources: list[str]) -> np.ndarray:
    """Weights that make every source count equally, whatever its row count."""
    counts = Counter(sources)
    return np.array([1.0 / counts[s] for s in sources], dtype=np.float64)


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, default: float = 0.5) -> float:
    """Threshold that maximises (weighted) F1; ``default`` when one class is missing."""
    from sklearn.metrics import precision_recall_curve

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
