"""The out-of-source protocol: what decides whether a model ships.

Rows come from sources the model never trained on (``training.data.heldout``), split in two
fixed halves by text hash. Thresholds are chosen on the *tune* half: per policy the best F1
(validation rows plus held-out tune rows, every source weighted equally) among thresholds
whose false-positive rate is at most ``max_fpr`` on **every** held-out benign source. Every
figure is reported on the *test* half, which nothing was fitted on.

The summary that promotion compares is the mean, over held-out cells (policy × source ×
class with at least ``MIN_CELL`` rows), of the cell's accuracy: recall on an unsafe cell,
1 − FPR on a benign cell. Every source counts the same, so a model cannot buy the summary by
flagging everything (benign cells fall) or nothing (unsafe cells fall).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.heldout import half_of
from training.data.rows import Example
from training.eval.metrics import binary_scores, report, rows_by_policy, source_groups, source_weights

MIN_CELL = 10
MAX_FPR = 0.05
GRID = np.unique(np.concatenate([np.linspace(0.01, 0.99, 99), np.linspace(0.991, 0.9995, 18)]))


def halves(rows: list[Example]) -> tuple[list[int], list[int]]:
    """Indices of the tune half and of the test half."""
    tune, test = [], []
    for i, ex in enumerate(rows):
        (tune if half_of(ex.text) == "tune" else test).append(i)
    return tune, test


def capped_heldout(rows: list[Example], per_cell: int) -> list[Example]:
    """At most ``per_cell`` rows of each (policy, source, label, half), chosen by text hash (stable):
    what a budgeted scorer (the merge search, the capacity trial) scores instead of every row."""
    cells: dict[tuple[str, str, int, str], list[Example]] = defaultdict(list)
    for ex in rows:
        cells[(ex.policy_id, ex.source, ex.label, half_of(ex.text))].append(ex)
    out: list[Example] = []
    for key in sorted(cells):
        group = sorted(cells[key], key=lambda e: hashlib.sha256(e.text.encode()).hexdigest())
        out.extend(group[:per_cell])
    return out


def _weighted_f1(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, t: float) -> float:
    pred = scores >= t
    tp = float(weights[pred & (labels == 1)].sum())
    fp = float(weights[pred & (labels == 0)].sum())
    fn = float(weights[~pred & (labels == 1)].sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def bounded_thresholds(
    validation: list[Example],
    val_scores: np.ndarray,
    tune: list[Example],
    tune_scores: np.ndarray,
    fallback: dict[str, float],
    max_fpr: float = MAX_FPR,
) -> dict[str, float]:
    """Per policy: best F1 subject to FPR <= ``max_fpr`` on every held-out benign source (tune half).

    A policy without held-out benign rows keeps its ``fallback`` threshold (the validation target)."""
    rows = validation + tune
    scores = np.concatenate([val_scores, tune_scores])
    groups = source_groups(rows)
    out = dict(fallback)
    tune_by_policy = rows_by_policy(tune)
    for pid, idx in rows_by_policy(rows).items():
        benign: dict[str, list[int]] = defaultdict(list)
        for i in tune_by_policy.get(pid, []):
            if tune[i].label == 0:
                benign[tune[i].source].append(i)
        benign = {s: ix for s, ix in benign.items() if len(ix) >= MIN_CELL}
        if not benign:
            continue
        labels = np.array([rows[i].label for i in idx])
        weights = source_weights([groups[i] for i in idx])
        best_t, best_f1 = None, -1.0
        for t in GRID:
            if any(float((tune_scores[ix] >= t).mean()) > max_fpr for ix in benign.values()):
                continue
            f1 = _weighted_f1(labels, scores[idx], weights, float(t))
            if f1 > best_f1:
                best_t, best_f1 = float(t), f1
        out[pid] = best_t if best_t is not None else float(GRID[-1])
    return out


@dataclass
class HeldoutResult:
    """Figures on the held-out test half at the served thresholds."""

    report: dict[str, dict[str, Any]]
    cells: list[dict[str, Any]]
    summary: float
    sources: list[str]
    rows: int

    def as_dict(self) -> dict[str, Any]:
        worst_fpr = max((c["fpr"] for c in self.cells if c["label"] == 0), default=None)
        worst_recall = min((c["recall"] for c in self.cells if c["label"] == 1), default=None)
        return {
            "protocol": "evaluation-only sources; thresholds on the tune half, figures on the test half",
            "sources": self.sources,
            "rows": self.rows,
            "summary": round(self.summary, 4),
            "worst_fpr": worst_fpr,
            "worst_recall": worst_recall,
            "cells": self.cells,
            "by_policy": {pid: e["overall"] for pid, e in self.report.items()},
        }


def heldout_result(rows: list[Example], scores: np.ndarray, thresholds: dict[str, float]) -> HeldoutResult:
    """Per (policy, source, class) cell: recall or FPR at the policy's threshold; the summary."""
    rep = report(rows, scores, thresholds)
    cells: list[dict[str, Any]] = []
    by_cell: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for i, ex in enumerate(rows):
        by_cell[(ex.policy_id, ex.source, ex.label)].append(i)
    for (pid, source, label), idx in sorted(by_cell.items()):
        if len(idx) < MIN_CELL:
            continue
        flagged = float((scores[idx] >= thresholds.get(pid, 0.5)).mean())
        cell: dict[str, Any] = {"policy": pid, "source": source, "label": label, "n": len(idx)}
        if label == 1:
            cell["recall"] = round(flagged, 4)
        else:
            cell["fpr"] = round(flagged, 4)
        both = rep[pid]["by_source"].get(source, {})
        cell["f1"] = both.get("f1") if both.get("fpr") is not None else None
        cell["roc_auc"] = both.get("roc_auc")
        cells.append(cell)
    accs = [c["recall"] if c["label"] == 1 else 1.0 - c["fpr"] for c in cells]
    summary = float(np.mean(accs)) if accs else 0.0
    return HeldoutResult(rep, cells, summary, sorted({ex.source for ex in rows}), len(rows))


def cells_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the card / evaluate table: policy, source, n, recall, FPR, F1, ROC-AUC."""

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)

    return [
        [c["policy"], c["source"], "unsafe" if c["label"] else "benign", str(c["n"]),
         fmt(c.get("recall")), fmt(c.get("fpr")), fmt(c.get("f1")), fmt(c.get("roc_auc"))]
        for c in result["cells"]
    ]  # fmt: skip


HEADER = ["policy", "held-out source", "class", "n", "recall %", "FPR %", "F1 (source)", "ROC-AUC"]


def binary(rows: list[Example], scores: np.ndarray, t: float) -> dict[str, Any]:
    """Figures of one group of rows at one threshold (for sweeps and zero-shot tables)."""
    return binary_scores(np.array([ex.label for ex in rows]), scores, t)
