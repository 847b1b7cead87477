"""Robustness figures of a released folder: benign-prefix sweep and zero-shot policies.

Both score through the service's loader with the folder's own calibration, at its own
thresholds (zero-shot: the manifest's default threshold, which the service applies to an
inline policy), so the figures are what a client would see. The zero-shot rows also score a
torch checkpoint inside the recipe (``zero_shot_of``), and ``zero_shot_spread`` summarises
them across seeds.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.policy import Policy, load_policies
from service.model.calibration import apply_calibration
from service.model.manifest import read_manifest
from training.data.heldout import ZERO_SHOT_POLICIES, half_of, zero_shot_rows
from training.data.rows import Example
from training.eval.heldout import binary, buried, prefix_pool
from training.eval.scoring import onnx_scorer, score

PREFIX_CHARS = (0, 300, 1000, 3000)
MAX_DROP = 0.05  # recall may fall by at most 5 points with 3,000 characters of benign text before it


def _scores(folder: Path, rows: list[Example], policies: dict[str, Policy], threads: int) -> np.ndarray:
    raw, _ = score(onnx_scorer(folder, threads), rows, policies)
    return np.asarray(apply_calibration(read_manifest(folder).calibration, raw))


def prefix_sweep(
    folder: Path,
    heldout: list[Example],
    policies: dict[str, Policy],
    *,
    per_policy: int = 80,
    seed: int = 13,
    threads: int = 0,
) -> list[dict[str, Any]]:
    """Recall of short held-out unsafe rows (test half) with 0-3,000 characters of held-out
    benign text before them, per policy, at the folder's thresholds."""
    rng = random.Random(seed)
    manifest = read_manifest(folder)
    test = [ex for ex in heldout if half_of(ex.text) == "test" and ex.policy_id in manifest.policies]
    benign = prefix_pool(test)
    out: list[dict[str, Any]] = []
    for pid in sorted({ex.policy_id for ex in test if ex.label == 1}):
        unsafe = sorted((ex for ex in test if ex.policy_id == pid and ex.label == 1 and len(ex.text) <= 500),
                        key=lambda e: e.text)  # fmt: skip
        rng.shuffle(unsafe)
        unsafe = unsafe[:per_policy]
        if not unsafe:
            continue
        row: dict[str, Any] = {"policy": pid, "n": len(unsafe)}
        for chars in PREFIX_CHARS:
            texts = []
            for ex in unsafe:
                texts.append(Example(buried(ex.text, benign, chars, rng), 1, pid, ex.source))
            s = _scores(folder, texts, policies, threads)
            row[f"recall@{chars}"] = round(float((s >= manifest.policies[pid].threshold).mean()), 4)
        row["drop"] = round(row["recall@0"] - min(row[f"recall@{c}"] for c in PREFIX_CHARS), 4)
        out.append(row)
    return out


def _per_policy(rows: list[Example], scores: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    out = []
    for pid in sorted({ex.policy_id for ex in rows}):
        idx = [i for i, ex in enumerate(rows) if ex.policy_id == pid]
        out.append({"policy": pid, "threshold": threshold, **binary([rows[i] for i in idx], scores[idx], threshold)})
    return out


def zero_shot(folder: Path, threads: int = 0) -> list[dict[str, Any]]:
    """Policies no model trained on (hand-written rows), at the default threshold for inline policies."""
    rows = zero_shot_rows()
    if not rows:
        return []
    s = _scores(folder, rows, load_policies(ZERO_SHOT_POLICIES), threads)
    return _per_policy(rows, s, read_manifest(folder).default_threshold)


def zero_shot_of(checkpoint: Path, threads: int = 0, threshold: float = 0.5) -> list[dict[str, Any]]:
    """The same rows on a torch checkpoint (raw scores, the service's inline threshold): GIP's
    claim measured inside the recipe, before any release."""
    from training.eval.scoring import torch_scorer

    rows = zero_shot_rows()
    scores, _ = score(torch_scorer(checkpoint, threads=threads), rows, load_policies(ZERO_SHOT_POLICIES))
    return _per_policy(rows, np.asarray(scores), threshold)


ZERO_SHOT_HEADER = ["policy", "n", "precision", "recall", "F1", "FPR", "ROC-AUC"]


def zero_rows(zero: list[dict[str, Any]]) -> list[list[Any]]:
    return [[z["policy"], z.get("n"), z.get("precision"), z.get("recall"), z.get("f1"), z.get("fpr"), z.get("roc_auc")]
            for z in zero]  # fmt: skip


SPREAD_METRICS = ("precision", "recall", "f1", "fpr", "roc_auc")


def zero_shot_spread(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per zero-shot policy, mean, sample standard deviation and range of each metric over the runs
    (their ``summary.json``: one seed each): GIP judged across seeds, not on one run."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        for z in summary.get("gip_zero_shot") or []:
            by_policy.setdefault(z["policy"], []).append(z)
    out = []
    for pid, runs in sorted(by_policy.items()):
        row: dict[str, Any] = {"policy": pid, "runs": len(runs)}
        for m in SPREAD_METRICS:
            values = np.array([r[m] for r in runs if r.get(m) is not None], dtype=float)
            if len(values):
                sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                row[m] = {
                    "mean": float(values.mean()),
                    "sd": sd,
                    "min": float(values.min()),
                    "max": float(values.max()),
                }
        out.append(row)
    return out


def spread_rows(spread: list[dict[str, Any]]) -> list[list[Any]]:
    def cell(v: dict[str, float] | None) -> str:
        return "–" if v is None else f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

    return [[r["policy"], r["runs"], *(cell(r.get(m)) for m in SPREAD_METRICS)] for r in spread]


SPREAD_HEADER = ["policy", "runs", "precision", "recall", "F1", "FPR", "ROC-AUC"]
