"""Binary guardrail metrics (unsafe = positive), per policy and per source."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from training.data.rows import Example


def binary_scores(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Precision, recall, F1, FPR, accuracy and ROC-AUC at one threshold (None where undefined)."""
    labels = np.asarray(labels, dtype=int)
    pred = (np.asarray(scores) >= threshold).astype(int)
    n_pos = int(labels.sum())
    n_neg = int(len(labels) - n_pos)
    out: dict[str, float | int | None] = {"n": len(labels), "unsafe": n_pos}
    if n_pos:
        p, r, f, _ = precision_recall_fscore_support(labels, pred, average="binary", pos_label=1, zero_division=0)
        out.update(precision=round(float(p), 4), recall=round(float(r), 4), f1=round(float(f), 4))
    else:
        out.update(precision=None, recall=None, f1=None)
    out["fpr"] = round(float(((pred == 1) & (labels == 0)).sum() / n_neg), 4) if n_neg else None
    out["accuracy"] = round(float((pred == labels).mean()), 4) if len(labels) else None
    out["roc_auc"] = round(float(roc_auc_score(labels, scores)), 4) if n_pos and n_neg else None
    return out


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Unrounded F1 (0 without true positives): the search's reward needs every digit."""
    pred = scores >= threshold
    tp = float((pred & (labels == 1)).sum())
    fp = float((pred & (labels == 0)).sum())
    fn = float((~pred & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def source_weights(sources: list[str]) -> np.ndarray:
    """Weights that make every source count equally, whatever its row count."""
    counts = Counter(sources)
    return np.array([1.0 / counts[s] for s in sources], dtype=np.float64)


def source_groups(examples: list[Example]) -> list[str]:
    """Lent rows (``benign:*``, ``cross:*``) pooled per kind, so a 5-row group cannot swing a threshold."""
    return [ex.source.split(":")[0] for ex in examples]


def rows_by_policy(examples: list[Example]) -> dict[str, list[int]]:
    """Row indices per policy, policies sorted."""
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    return dict(sorted(by_pid.items()))


def report(
    examples: list[Example], scores: np.ndarray, thresholds: dict[str, float], default: float = 0.5
) -> dict[str, dict[str, Any]]:
    """{policy: {"threshold", "overall": scores, "by_source": {source: scores}}} at each policy's threshold."""
    out: dict[str, dict[str, Any]] = {}
    for pid, idx in rows_by_policy(examples).items():
        t = thresholds.get(pid, default)
        labels = np.array([examples[i].label for i in idx])
        entry: dict[str, Any] = {
            "threshold": round(t, 4),
            "overall": binary_scores(labels, scores[idx], t),
            "by_source": {},
        }
        by_src: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            by_src[examples[i].source].append(i)
        for src, sidx in sorted(by_src.items()):
            entry["by_source"][src] = binary_scores(np.array([examples[i].label for i in sidx]), scores[sidx], t)
        out[pid] = entry
    return out


def mean_f1(rep: dict[str, dict[str, Any]]) -> float:
    """Mean validation F1 over the policies of a ``report`` that have one."""
    vals = [e["overall"]["f1"] for e in rep.values() if e["overall"].get("f1") is not None]
    return sum(vals) / len(vals) if vals else 0.0


def metrics_by_policy(
    examples: list[Example], scores: np.ndarray, latency: np.ndarray, threshold: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Per policy: precision, recall, F1, FPR, ROC-AUC at ``threshold`` and p50/p95 latency (ms)."""
    out: dict[str, dict[str, Any]] = {}
    for pid, idx in rows_by_policy(examples).items():
        labels = np.array([examples[i].label for i in idx])
        m: dict[str, Any] = dict(binary_scores(labels, scores[idx], threshold))
        m["threshold"] = threshold
        m["latency_ms_p50"] = round(float(np.percentile(latency[idx], 50) * 1000), 3)
        m["latency_ms_p95"] = round(float(np.percentile(latency[idx], 95) * 1000), 3)
        out[pid] = m
    return out
