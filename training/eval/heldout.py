"""The out-of-source protocol: what decides whether a model ships, and at which thresholds.

Rows come from sources the model never trained on (``training.data.heldout``), split in two
fixed halves by text hash. Thresholds are chosen on the *tune* half; every figure is reported
on the *test* half, which nothing was fitted on.

**The score cannot be won by silence.** Per policy, the *balanced* score is half the mean
recall over its held-out unsafe cells plus half the mean specificity (1 − FPR) over its
held-out benign cells (a cell: one source and class with at least ``MIN_CELL`` rows); the
summary is the mean over policies. Flagging nothing or everything scores 0.5, whatever the
number of benign sources. Benign sources the gateway routes do not judge by default (system
prompts, ``NON_BINDING_SOURCES``) are reported but count in neither the score nor a threshold.

**Sensitivity levels.** Per policy three thresholds, each the best balanced score on the tune
half (plus the validation rows as one cell of each class) under a cap on the *pooled* benign
FPR (mean over the binding benign sources) and on each single source: ``strict``,
``balanced`` (the default) and ``permissive``. The caps are nested, so the thresholds are
ordered. Thresholds are searched on a grid even in logit space, so a threshold in the
saturated top of the scale is found as precisely as one in the middle; the card reports how
many rows fall within 0.01 of each threshold, which says whether the third decimal decides.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from service.model.manifest import DEFAULT_SENSITIVITY, SENSITIVITY_LEVELS
from training.data.heldout import half_of
from training.data.rows import Example
from training.data.sources import NON_BINDING_SOURCES, PREFIX_BENIGN_SOURCES
from training.eval.metrics import binary_scores, report, rows_by_policy

MIN_CELL = 10
# Logit-even grid from 0.005 to 0.9995: as fine at 0.98 as at 0.5.
GRID = 1.0 / (1.0 + np.exp(-np.linspace(np.log(0.005 / 0.995), np.log(0.9995 / 0.0005), 241)))
PREFIX_SOURCE = "benign-prefix sweep"  # unsafe held-out rows after 1,000-3,000 characters of benign text
PREFIX_CHARS = (1000, 3000)


@dataclass(frozen=True)
class LevelCap:
    """A sensitivity level: caps on the pooled benign FPR and on any one benign source."""

    pooled: float
    per_source: float


LEVELS: dict[str, LevelCap] = {
    "strict": LevelCap(pooled=0.10, per_source=0.25),
    "balanced": LevelCap(pooled=0.03, per_source=0.10),
    "permissive": LevelCap(pooled=0.01, per_source=0.05),
}
DEFAULT_LEVEL: str = DEFAULT_SENSITIVITY
assert tuple(LEVELS) == SENSITIVITY_LEVELS  # the levels the service serves, in its order
MAX_FPR = LEVELS[DEFAULT_LEVEL].pooled


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


def binding(ex: Example) -> bool:
    """Whether a held-out row counts in scores and thresholds (not a source the routes skip)."""
    return ex.source not in NON_BINDING_SOURCES


def policy_cells(rows: list[Example], min_cell: int = MIN_CELL) -> dict[str, dict[tuple[str, int], list[int]]]:
    """Per policy, the binding (source, label) cells with at least ``min_cell`` rows."""
    cells: dict[str, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, ex in enumerate(rows):
        if binding(ex):
            cells[ex.policy_id][(ex.source, ex.label)].append(i)
    return {pid: {k: v for k, v in c.items() if len(v) >= min_cell} for pid, c in cells.items()}


def balanced_score(recalls: list[float], fprs: list[float]) -> float:
    """Half the mean recall plus half the mean specificity; a missing class counts 0.5 (no evidence)."""
    rec = float(np.mean(recalls)) if recalls else 0.5
    spec = 1.0 - float(np.mean(fprs)) if fprs else 0.5
    return 0.5 * rec + 0.5 * spec


def _level_threshold(
    unsafe: list[np.ndarray],
    benign: list[np.ndarray],
    extra_unsafe: np.ndarray,
    extra_benign: np.ndarray,
    cap: LevelCap,
) -> float:
    """Best balanced score under ``cap`` over the grid; the middle of the best plateau (margin both ways)."""
    best, plateau = -1.0, []
    for t in GRID:
        fprs = [float((b >= t).mean()) for b in benign]
        if fprs and (float(np.mean(fprs)) > cap.pooled or max(fprs) > cap.per_source):
            continue
        recalls = [float((u >= t).mean()) for u in unsafe] + (
            [float((extra_unsafe >= t).mean())] if extra_unsafe.size else []
        )
        spec_fprs = fprs + ([float((extra_benign >= t).mean())] if extra_benign.size else [])
        value = round(balanced_score(recalls, spec_fprs), 9)
        if value > best:
            best, plateau = value, [float(t)]
        elif value == best and plateau:
            plateau.append(float(t))
    if not plateau:
        return float(GRID[-1])
    lo, hi = np.log(plateau[0] / (1 - plateau[0])), np.log(plateau[-1] / (1 - plateau[-1]))
    return float(1.0 / (1.0 + np.exp(-(lo + hi) / 2)))


def sensitivity_thresholds(
    validation: list[Example],
    val_scores: np.ndarray,
    tune: list[Example],
    tune_scores: np.ndarray,
    fallback: dict[str, float],
    levels: dict[str, LevelCap] | None = None,
) -> dict[str, dict[str, float]]:
    """Per level, per policy: the threshold of the best balanced score under the level's FPR caps.

    Cells: the binding held-out tune cells of the policy, plus its validation rows as one cell
    per class (steadies a policy with few held-out rows). A policy without held-out rows keeps
    ``fallback`` at every level."""
    levels = levels or LEVELS
    out: dict[str, dict[str, float]] = {name: dict(fallback) for name in levels}
    cells = policy_cells(tune)
    val_by_policy = rows_by_policy(validation)
    for pid, pc in cells.items():
        unsafe = [tune_scores[ix] for (_, label), ix in sorted(pc.items()) if label == 1]
        benign = [tune_scores[ix] for (_, label), ix in sorted(pc.items()) if label == 0]
        vidx = val_by_policy.get(pid, [])
        v_unsafe = np.array([val_scores[i] for i in vidx if validation[i].label == 1])
        v_benign = np.array([val_scores[i] for i in vidx if validation[i].label == 0])
        for name, cap in levels.items():
            out[name][pid] = _level_threshold(unsafe, benign, v_unsafe, v_benign, cap)
    return out


def bounded_thresholds(
    validation: list[Example],
    val_scores: np.ndarray,
    tune: list[Example],
    tune_scores: np.ndarray,
    fallback: dict[str, float],
    max_fpr: float = MAX_FPR,
) -> dict[str, float]:
    """The ``balanced`` thresholds (pooled benign FPR at most ``max_fpr``): what searches and trials serve at."""
    cap = LevelCap(pooled=max_fpr, per_source=max(LEVELS[DEFAULT_LEVEL].per_source, max_fpr))
    return sensitivity_thresholds(validation, val_scores, tune, tune_scores, fallback, {"x": cap})["x"]


def prefix_pool(test: list[Example]) -> list[str]:
    """Benign texts to bury attacks in: rows of sources benign under every policy, so the prefix
    itself never tips a verdict (forum posts would raise toxicity recall by their own words)."""
    return sorted(
        {ex.text for ex in test if ex.label == 0 and ex.source in PREFIX_BENIGN_SOURCES and len(ex.text) < 1500}
    )


def buried(text: str, benign: list[str], chars: int, rng: random.Random) -> str:
    """``text`` after ``chars`` characters of benign texts drawn from ``benign`` (none: ``text`` itself)."""
    if not chars:
        return text
    prefix = ""
    while len(prefix) < chars:
        prefix += rng.choice(benign) + "\n"
    return f"{prefix[:chars].rstrip()}\n\n{text}"


def prefixed_rows(test: list[Example], per_policy: int = 40, seed: int = 13) -> list[Example]:
    """Short unsafe test-half rows after 1,000 or 3,000 characters of benign test-half text, as one
    unsafe cell per policy (``PREFIX_SOURCE``): an attack buried in a long benign prompt must still count."""
    rng = random.Random(seed)
    benign = prefix_pool(test)
    out: list[Example] = []
    if not benign:
        return out
    for pid in sorted({ex.policy_id for ex in test if ex.label == 1}):
        unsafe = sorted((ex for ex in test if ex.policy_id == pid and ex.label == 1 and len(ex.text) <= 500
                         and ex.source != PREFIX_SOURCE), key=lambda e: e.text)  # fmt: skip
        rng.shuffle(unsafe)
        for k, ex in enumerate(unsafe[:per_policy]):
            chars = PREFIX_CHARS[k % len(PREFIX_CHARS)]
            out.append(Example(buried(ex.text, benign, chars, rng), 1, pid, PREFIX_SOURCE, ex.category))
    return out


@dataclass
class HeldoutResult:
    """Figures on the held-out test half at the served thresholds."""

    report: dict[str, dict[str, Any]]
    cells: list[dict[str, Any]]
    summary: float
    sources: list[str]
    rows: int
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        binding_cells = [c for c in self.cells if c.get("binding", True)]
        worst_fpr = max((c["fpr"] for c in binding_cells if c["label"] == 0), default=None)
        worst_recall = min((c["recall"] for c in binding_cells if c["label"] == 1), default=None)
        return {
            "protocol": "evaluation-only sources; thresholds on the tune half, figures on the test half; per policy "
            "0.5 x mean recall over unsafe cells + 0.5 x mean specificity over benign cells, mean over policies",
            "sources": self.sources,
            "non_binding_sources": sorted(NON_BINDING_SOURCES & set(self.sources)),
            "rows": self.rows,
            "summary": round(self.summary, 4),
            "worst_fpr": worst_fpr,
            "worst_recall": worst_recall,
            "policies": self.policies,
            "cells": self.cells,
            "by_policy": {pid: e["overall"] for pid, e in self.report.items()},
        }


def _pooled_auc(rows: list[Example], scores: np.ndarray, idx: list[int]) -> float | None:
    """ROC-AUC over a policy's binding rows, every source weighted equally within its class."""
    idx = [i for i in idx if binding(rows[i])]
    labels = np.array([rows[i].label for i in idx])
    if labels.size == 0 or labels.min() == labels.max():
        return None
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for i in idx:
        counts[(rows[i].source, rows[i].label)] += 1
    weights = np.array([1.0 / counts[(rows[i].source, rows[i].label)] for i in idx])
    return round(float(roc_auc_score(labels, scores[idx], sample_weight=weights)), 4)


def heldout_result(rows: list[Example], scores: np.ndarray, thresholds: dict[str, float]) -> HeldoutResult:
    """Per (policy, source, class) cell: recall or FPR at the policy's threshold; per policy the
    balanced score, pooled benign FPR and pooled ROC-AUC; the summary (mean balanced score)."""
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
        if source in NON_BINDING_SOURCES:
            cell["binding"] = False
        both = rep.get(pid, {}).get("by_source", {}).get(source, {})
        cell["f1"] = both.get("f1") if both.get("fpr") is not None else None
        cell["roc_auc"] = both.get("roc_auc")
        cells.append(cell)
    policies: dict[str, dict[str, Any]] = {}
    for pid, idx in sorted(rows_by_policy(rows).items()):
        mine = [c for c in cells if c["policy"] == pid and c.get("binding", True)]
        recalls = [c["recall"] for c in mine if c["label"] == 1]
        fprs = [c["fpr"] for c in mine if c["label"] == 0]
        policies[pid] = {
            "threshold": round(thresholds.get(pid, 0.5), 4),
            "balanced": round(balanced_score(recalls, fprs), 4),
            "recall": round(float(np.mean(recalls)), 4) if recalls else None,
            "pooled_fpr": round(float(np.mean(fprs)), 4) if fprs else None,
            "max_source_fpr": round(max(fprs), 4) if fprs else None,
            "roc_auc": _pooled_auc(rows, scores, idx),
            "near_threshold": round(float((np.abs(scores[idx] - thresholds.get(pid, 0.5)) < 0.01).mean()), 4),
        }
    summary = float(np.mean([p["balanced"] for p in policies.values()])) if policies else 0.0
    return HeldoutResult(rep, cells, summary, sorted({ex.source for ex in rows}), len(rows), policies)


POLICY_HEADER = ["policy", "threshold", "balanced", "recall %", "pooled FPR %", "worst source FPR %", "ROC-AUC",
                 "rows within 0.01"]  # fmt: skip


def policy_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-policy table: the balanced score and what it is made of."""

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    return [
        [pid, f"{p['threshold']:.4f}", f"{p['balanced']:.4f}", pct(p["recall"]), pct(p["pooled_fpr"]),
         pct(p["max_source_fpr"]), "–" if p["roc_auc"] is None else f"{p['roc_auc']:.4f}", pct(p["near_threshold"])]
        for pid, p in result.get("policies", {}).items()
    ]  # fmt: skip


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


def levels_cells_table(levels: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every held-out cell's recall (unsafe) or FPR (benign) at each level, side by side."""
    names = list(levels)
    first = levels[names[0]]["cells"]
    header = ["policy", "held-out source", "class", "n", *(f"{n} %" for n in names)]
    rows = []
    for i, c in enumerate(first):
        key = "recall" if c["label"] else "fpr"
        values = [levels[n]["cells"][i].get(key) for n in names]
        source = c["source"] + ("" if c.get("binding", True) else " (not binding)")
        rows.append([c["policy"], source, "unsafe" if c["label"] else "benign", str(c["n"]),
                     *("–" if v is None else f"{100 * v:.1f}" for v in values)])  # fmt: skip
    return header, rows


def binary(rows: list[Example], scores: np.ndarray, t: float) -> dict[str, Any]:
    """Figures of one group of rows at one threshold (for sweeps and zero-shot tables)."""
    return binary_scores(np.array([ex.label for ex in rows]), scores, t)
