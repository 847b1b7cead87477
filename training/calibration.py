"""Calibrated scores and per-policy thresholds for a stated target.

* **Calibration**: one temperature ``T`` fitted on the validation split by minimising the
  negative log-likelihood of ``sigmoid(logit(p) / T)`` (temperature scaling: one parameter,
  order-preserving, hard to overfit). The service applies it (``service/calibration.py``),
  so the ``score`` a client sees is a calibrated probability. ECE (expected calibration
  error, 15 equal-width bins) is reported before and after, and after again with the
  temperature fitted on the other half of the rows only (2-fold cross-fitting), an honest
  figure since fitting and measuring on the same rows flatters it.
* **Thresholds**, per policy, on calibrated scores, every source weighted equally (as
  ``training.evaluate.choose_thresholds``): ``best-f1`` (highest F1) or ``max-fpr:X`` (the
  lowest threshold whose false-positive rate on the policy's safe rows is at most X).
* **Artefacts**: ``calibration`` and ``threshold_target`` in manifest.json, the thresholds
  and their validation figures per policy, ``reliability.png`` next to CARD.md and a
  calibration section in the card.

``calibrate_model_dir`` does all of it to an existing exported folder in place, atomically
(``python -m training.cli calibrate``); ``build_default`` calls ``calibrate_validation`` for
new builds. Recalibrating is idempotent: raw scores come from onnxruntime, which never sees
the calibration.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.calibration import Calibration, logit, sigmoid
from service.manifest import MANIFEST_FILE, PolicyEntry, read_manifest, sha256_file
from service.policy import DEFAULT_POLICIES_DIR, load_policies
from training.data import Example
from training.metrics import best_f1_threshold, source_weights

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
    return [(float(probs[idx == b].mean()), float(labels[idx == b].mean()), int((idx == b).sum())) for b in range(bins) if (idx == b).any()]


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


# -- temperature scaling ---------------------------------------------------------------------


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T minimising the NLL of sigmoid(logit(p) / T) (1-D, bounded, on log T)."""
    from scipy.optimize import minimize_scalar

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
            method="temperature", temperature=round(self.temperature, 6), fitted_on="validation split", n=self.n,
            ece_bins=ECE_BINS, ece_before=round(self.ece_before, 5), ece_after=round(self.ece_after, 5),
            ece_after_cross_fitted=round(self.ece_after_cross_fitted, 5), nll_before=round(self.nll_before, 5),
            nll_after=round(self.nll_after, 5), brier_before=round(self.brier_before, 5), brier_after=round(self.brier_after, 5),
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
        temperature=t, n=int(labels.size), ece_before=ece(labels, raw), ece_after=ece(labels, cal),
        ece_after_cross_fitted=ece(labels, cross_fitted(labels, raw)), nll_before=nll(labels, raw), nll_after=nll(labels, cal),
        brier_before=brier(labels, raw), brier_after=brier(labels, cal), raw=raw, calibrated=cal, labels=labels,
    )


# -- thresholds for a target -------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdTarget:
    """``best-f1`` or ``max-fpr:0.05`` (a false-positive rate on the policy's safe rows)."""

    kind: str = "best_f1"
    max_fpr: float | None = None

    @classmethod
    def parse(cls, text: str) -> "ThresholdTarget":
        t = text.strip().lower().replace("_", "-")
        if t in ("best-f1", "f1"):
            return cls("best_f1")
        if t.startswith("max-fpr:"):
            value = float(t.split(":", 1)[1])
            if not 0.0 <= value < 1.0:
                raise ValueError(f"max-fpr must be in [0, 1): {value}")
            return cls("max_fpr", value)
        raise ValueError(f"unknown threshold target {text!r}: use best-f1 or max-fpr:<rate>, e.g. max-fpr:0.05")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind} if self.max_fpr is None else {"kind": self.kind, "max_fpr": self.max_fpr}

    def describe(self) -> str:
        if self.kind == "best_f1":
            return "the highest F1"
        return f"the lowest threshold whose false-positive rate is at most {self.max_fpr:g}"


def max_fpr_threshold(labels: np.ndarray, scores: np.ndarray, max_fpr: float, weights: np.ndarray | None = None, default: float = 0.5) -> float:
    """Lowest threshold (score >= t is unsafe) with weighted FPR <= max_fpr, placed midway to
    the next lower score; ``default`` when the policy has no safe rows."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    neg = labels == 0
    if not neg.any():
        return default
    neg_total = w[neg].sum()
    candidates = np.unique(scores)  # ascending
    best = 1.0 - 1e-4
    for t in candidates:
        if w[neg & (scores >= t)].sum() / neg_total <= max_fpr + 1e-12:
            best = float(t)
            break
    lower = scores[scores < best]
    if lower.size:
        best = (best + float(lower.max())) / 2
    return float(np.clip(best, 1e-4, 1 - 1e-4))


def choose_thresholds_for(examples: list[Example], scores: np.ndarray, target: ThresholdTarget, default: float = 0.5) -> dict[str, float]:
    """Per policy, sources weighted equally (lent benign:/cross: rows pooled per kind)."""
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    out = {}
    for pid, idx in by_pid.items():
        labels = np.array([examples[i].label for i in idx])
        weights = source_weights([examples[i].source.split(":")[0] for i in idx])
        if target.kind == "best_f1":
            out[pid] = best_f1_threshold(labels, scores[idx], weights, default=default)
        else:
            assert target.max_fpr is not None
            out[pid] = max_fpr_threshold(labels, scores[idx], target.max_fpr, weights, default=default)
    return out


# -- artefacts ---------------------------------------------------------------------------------


def per_policy_ece(examples: list[Example], fit: CalibrationFit) -> dict[str, tuple[int, float, float]]:
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    return {
        pid: (len(idx), ece(fit.labels[idx], fit.raw[idx]), ece(fit.labels[idx], fit.calibrated[idx]))
        for pid, idx in sorted(by_pid.items())
    }


def reliability_diagram(path: Path, fit: CalibrationFit, title: str) -> Path:
    """Reliability curves before and after calibration, with the score histogram below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
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
    plt.close(fig)
    return Path(path)


def card_section(fit: CalibrationFit, target: ThresholdTarget, policy_ece: dict[str, tuple[int, float, float]]) -> str:
    lines = [
        "## Calibration",
        "",
        f"Scores are calibrated probabilities: temperature scaling, `sigmoid(logit(p) / T)` with T = {fit.temperature:.3f}",
        f"fitted on the {fit.n} validation rows (negative log-likelihood), applied by the service to every score.",
        f"Per-policy thresholds are chosen on calibrated scores for {target.describe()}, every source weighted equally;",
        "`UNIGUARD_THRESHOLDS` overrides them per policy.",
        "",
        f"![reliability diagram]({DIAGRAM_FILE})",
        "",
        f"| | raw | calibrated |",
        "|---|---|---|",
        f"| ECE ({ECE_BINS} bins) | {fit.ece_before:.4f} | {fit.ece_after:.4f} (2-fold cross-fitted: {fit.ece_after_cross_fitted:.4f}) |",
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


@dataclass
class ValidationCalibration:
    fit: CalibrationFit
    target: ThresholdTarget
    thresholds: dict[str, float]
    diagram: Path
    section: str

    @property
    def scores(self) -> np.ndarray:
        return self.fit.calibrated


def calibrate_validation(examples: list[Example], raw_scores: np.ndarray, target: ThresholdTarget, out_dir: Path, title: str) -> ValidationCalibration:
    """Fit, choose thresholds on calibrated scores, write reliability.png into ``out_dir``."""
    labels = np.array([ex.label for ex in examples], dtype=int)
    fit = fit_calibration(labels, raw_scores)
    thresholds = choose_thresholds_for(examples, fit.calibrated, target)
    diagram = reliability_diagram(Path(out_dir) / DIAGRAM_FILE, fit, title)
    return ValidationCalibration(fit, target, thresholds, diagram, card_section(fit, target, per_policy_ece(examples, fit)))


def read_examples(path: Path) -> list[Example]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(Example(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not an example row: {exc}") from exc
    return rows


def calibrate_model_dir(
    model_dir: Path, validation: Path, *, policies_dir: Path = DEFAULT_POLICIES_DIR, target: ThresholdTarget = ThresholdTarget(),
    threads: int = 0, progress: Any = None,
) -> dict[str, Any]:
    """Calibrate an exported folder in place: score ``validation`` raw through the service's
    loader, fit, choose thresholds, then swap in a copy with the new manifest, card and
    reliability diagram (model.onnx is untouched, so its sha256 and the version stay)."""
    from training.card import render_card
    from training.evaluate import report, score_examples
    from training.export import atomic_replace_dir, write_json_atomic

    model_dir = Path(model_dir)
    policies = load_policies(policies_dir)
    examples = read_examples(validation)
    skipped = sorted({ex.policy_id for ex in examples if ex.policy_id not in policies})
    examples = [ex for ex in examples if ex.policy_id in policies]
    if not examples:
        raise ValueError(f"{validation}: no rows for the policies in {policies_dir}")
    raw, _ = score_examples(model_dir, examples, policies, threads=threads, progress=progress)
    manifest = read_manifest(model_dir)
    staging = model_dir.with_name(f".tmp-calibrate-{model_dir.name}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(model_dir, staging)
    try:
        cal = calibrate_validation(examples, raw, target, staging, f"{manifest.name}@{manifest.version}: validation reliability")
        rep = report(examples, cal.scores, cal.thresholds)
        for pid, policy in policies.items():
            entry = rep.get(pid)
            old = manifest.policies.get(pid)
            if entry is None and old is None:
                continue
            manifest.policies[pid] = PolicyEntry.model_validate({
                "threshold": round(cal.thresholds.get(pid, manifest.default_threshold), 6),
                "description_sha256": policy.description_sha256(),
                "validation": entry["overall"] if entry else None,
                "validation_by_source": entry["by_source"] if entry else {},
            })
        manifest.calibration = cal.fit.manifest_entry()
        manifest.threshold_target = cal.target.as_dict()
        if not manifest.checksums:  # fingerprint the files the service checks, while we are here
            manifest.checksums = {f: sha256_file(staging / f) for f in ("tokenizer.json", "config.json") if (staging / f).exists()}
        manifest = type(manifest).model_validate(manifest.model_dump())
        write_json_atomic(staging / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
        train_rows = manifest.training.get("train_rows")
        card = render_card(manifest, rep, validation_rows=len(examples), train_rows=train_rows if isinstance(train_rows, int) else 0,
                           minutes=None, calibration=cal.section)
        (staging / "CARD.md").write_text(card, encoding="utf-8")
        atomic_replace_dir(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fit = cal.fit
    return {
        "model": f"{manifest.name}@{manifest.version}", "rows": fit.n, "temperature": round(fit.temperature, 4),
        "ece_before": round(fit.ece_before, 4), "ece_after": round(fit.ece_after, 4),
        "ece_after_cross_fitted": round(fit.ece_after_cross_fitted, 4), "nll_before": round(fit.nll_before, 4),
        "nll_after": round(fit.nll_after, 4), "target": cal.target.as_dict(),
        "thresholds": {pid: round(t, 4) for pid, t in sorted(cal.thresholds.items())}, "skipped_policies": skipped,
        "diagram": str(model_dir / DIAGRAM_FILE),
    }
