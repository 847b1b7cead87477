"""Calibrated scores: temperature scaling, its figures and its reliability diagram.

One temperature ``T`` is fitted on the validation split by minimising the negative
log-likelihood of ``sigmoid(logit(p) / T)`` (one parameter, order-preserving, hard to
overfit). The service applies it (``service/calibration.py``), so the ``score`` a client
sees is a calibrated probability. ECE (expected calibration error, 15 equal-width bins) is
reported before and after, and after again with the temperature fitted on the other half
of the rows only (2-fold cross-fitting), an honest figure since fitting and measuring on
the same rows flatters it. ``training.release.finalize`` puts all of it into a model folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from service.model.calibration import Calibration, logit, sigmoid
from training.data.rows import Example
from training.eval.metrics import rows_by_policy
from training.eval.thresholds import ThresholdTarget

ECE_BINS = 15
DIAGRAM_FILE = "reliability.png"
_T_BOUNDS = (0.05, 20.0)


# -- metrics ---------------------------------------------------------------------------------


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the unsafe probability: sum over equal-width bins of
    (rows in bin / rows) * |fraction unsafe - mean score|."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        return 0.0
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() / labels.size * abs(labels[mask].mean() - probs[mask].mean())
    return float(total)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean score, fraction unsafe, rows) of each non-empty bin."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    return [
        (float(probs[idx == b].mean()), float(labels[idx == b].mean()), int((idx == b).sum()))
        for b in range(bins)
        if (idx == b).any()
    ]


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


# -- temperature scaling ---------------------------------------------------------------------


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T minimising the NLL of sigmoid(logit(p) / T) (1-D, bounded, on log T)."""
    z = logit(probs)
    y = np.asarray(labels, dtype=np.float64)
    if y.min(initial=1) == y.max(initial=0):
        return 1.0  # one class only: nothing to calibrate against

    def loss(log_t: float) -> float:
        q = np.clip(sigmoid(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    res = minimize_scalar(loss, bounds=tuple(np.log(_T_BOUNDS)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


@dataclass
class CalibrationFit:
    temperature: float
    n: int
    ece_before: float
    ece_after: float
    ece_after_cross_fitted: float
    nll_before: float
    nll_after: float
    brier_before: float
    brier_after: float
    raw: np.ndarray = field(repr=False)
    calibrated: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    def manifest_entry(self) -> Calibration:
        return Calibration(
            method="temperature",
            temperature=round(self.temperature, 6),
            fitted_on="validation split",
            n=self.n,
            ece_bins=ECE_BINS,
            ece_before=round(self.ece_before, 5),
            ece_after=round(self.ece_after, 5),
            ece_after_cross_fitted=round(self.ece_after_cross_fitted, 5),
            nll_before=round(self.nll_before, 5),
            nll_after=round(self.nll_after, 5),
            brier_before=round(self.brier_before, 5),
            brier_after=round(self.brier_after, 5),
            fitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )


def cross_fitted(labels: np.ndarray, probs: np.ndarray, folds: int = 2, seed: int = 0) -> np.ndarray:
    """Each row calibrated with a temperature fitted on the other folds only."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(labels)) % folds
    out = np.empty(len(labels), dtype=np.float64)
    for k in range(folds):
        test = fold == k
        t = fit_temperature(labels[~test], probs[~test])
        out[test] = sigmoid(logit(probs[test]) / t)
    return out


def fit_calibration(labels: np.ndarray, raw: np.ndarray) -> CalibrationFit:
    labels = np.asarray(labels, dtype=int)
    raw = np.asarray(raw, dtype=np.float64)
    t = fit_temperature(labels, raw)
    cal = sigmoid(logit(raw) / t)
    return CalibrationFit(
        temperature=t,
        n=int(labels.size),
        ece_before=ece(labels, raw),
        ece_after=ece(labels, cal),
        ece_after_cross_fitted=ece(labels, cross_fitted(labels, raw)),
        nll_before=nll(labels, raw),
        nll_after=nll(labels, cal),
        brier_before=brier(labels, raw),
        brier_after=brier(labels, cal),
        raw=raw,
        calibrated=cal,
        labels=labels,
    )


# -- artefacts ---------------------------------------------------------------------------------


def per_policy_ece(examples: list[Example], fit: CalibrationFit) -> dict[str, tuple[int, float, float]]:
    """(rows, ECE raw, ECE calibrated) per policy: one temperature can leave one policy off."""
    return {
        pid: (len(idx), ece(fit.labels[idx], fit.raw[idx]), ece(fit.labels[idx], fit.calibrated[idx]))
        for pid, idx in rows_by_policy(examples).items()
    }


def reliability_diagram(path: Path, fit: CalibrationFit, title: str) -> Path:
    """Reliability curves before and after calibration, with the score histogram below.

    Drawn on a bare ``Figure`` (no pyplot): no global backend or figure state, safe in tests.
    """
    fig = Figure(figsize=(6, 7))
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, probs, ece_value, style in (
        ("raw", fit.raw, fit.ece_before, "o-"),
        (f"calibrated (T={fit.temperature:.2f})", fit.calibrated, fit.ece_after, "s-"),
    ):
        pts = reliability_bins(fit.labels, probs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=f"{name}: ECE {ece_value:.3f}")
    ax.set_ylabel("fraction unsafe")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    hist.hist([fit.raw, fit.calibrated], bins=edges, label=["raw", "calibrated"], log=True)
    hist.set_xlabel(f"unsafe score ({ECE_BINS} equal-width bins; validation rows: {fit.n})")
    hist.set_ylabel("rows")
    hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def card_section(fit: CalibrationFit, target: ThresholdTarget, policy_ece: dict[str, tuple[int, float, float]]) -> str:
    lines = [
        "## Calibration",
        "",
        "Scores are calibrated probabilities: temperature scaling, `sigmoid(logit(p) / T)` with "
        f"T = {fit.temperature:.3f}",
        f"fitted on the {fit.n} validation rows (negative log-likelihood), applied by the service to every score.",
        f"Per-policy thresholds are chosen on calibrated scores for {target.describe()}, "
        "every source weighted equally;",
        "`UNIGUARD_THRESHOLDS` overrides them per policy.",
        "",
        f"![reliability diagram]({DIAGRAM_FILE})",
        "",
        "| | raw | calibrated |",
        "|---|---|---|",
        f"| ECE ({ECE_BINS} bins) | {fit.ece_before:.4f} | {fit.ece_after:.4f} "
        f"(2-fold cross-fitted: {fit.ece_after_cross_fitted:.4f}) |",
        f"| negative log-likelihood | {fit.nll_before:.4f} | {fit.nll_after:.4f} |",
        f"| Brier score | {fit.brier_before:.4f} | {fit.brier_after:.4f} |",
        "",
        "| policy | n | ECE raw | ECE calibrated |",
        "|---|---|---|---|",
    ]
    lines += [f"| {pid} | {n} | {before:.4f} | {after:.4f} |" for pid, (n, before, after) in policy_ece.items()]
    lines += [
        "",
        "One temperature serves every policy, so a policy can stay mis-calibrated where the model is",
        "over-confident for it alone; the cross-fitted figure is the one to expect on new rows of the same sources.",
        "",
    ]
    return "\n".join(lines)
