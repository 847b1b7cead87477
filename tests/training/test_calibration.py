"""Temperature scaling, threshold targets, and calibrating an exported folder in place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.contract.policy import DEFAULT_POLICIES_DIR, load_policies, pad_batch
from service.model.calibration import sigmoid
from service.model.folder_checks import load_and_validate
from service.model.manifest import read_manifest, sha256_file
from service.model.onnx_model import OnnxModel
from tests.tiny import build_tiny_model_folder
from training.data.rows import Example, read_examples
from training.eval.heldout import PREFIX_SOURCE
from training.eval.thresholds import ThresholdTarget, choose_thresholds, max_fpr_threshold
from training.release.calibrate import ece, fit_calibration, fit_temperature
from training.release.finalize import ReleaseOptions, finalize


def synthetic(n: int = 4000, overconfidence: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the 'model' reports sigmoid(overconfidence * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < sigmoid(z)).astype(int)
    return labels, sigmoid(overconfidence * z)


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 20000)
    y = (rng.random(20000) < sigmoid(z)).astype(int)
    assert ece(y, sigmoid(z)) < 0.02
    assert ece(np.array([1, 1, 0, 0]), np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)


def test_temperature_recovers_overconfidence_and_lowers_ece() -> None:
    labels, probs = synthetic(overconfidence=3.0)
    assert fit_temperature(labels, probs) == pytest.approx(3.0, rel=0.15)
    fit = fit_calibration(labels, probs)
    assert fit.ece_after < fit.ece_before / 2 and fit.nll_after < fit.nll_before
    assert fit.ece_after_cross_fitted < fit.ece_before / 2
    # order kept: the same decisions at the matching threshold
    order = np.argsort(fit.raw, kind="stable")
    assert np.all(np.diff(fit.calibrated[order]) >= 0)  # non-decreasing (ties only below 1e-7, clipped)
    assert fit_temperature(np.ones(10), np.full(10, 0.9)) == 1.0  # one class: nothing to fit


def test_threshold_target_parsing() -> None:
    assert ThresholdTarget.parse("best-f1") == ThresholdTarget("best_f1")
    assert ThresholdTarget.parse("max-fpr:0.05") == ThresholdTarget("max_fpr", 0.05)
    for bad in ("max-fpr:2", "recall", "max-fpr:x"):
        with pytest.raises(ValueError):
            ThresholdTarget.parse(bad)


def test_max_fpr_threshold_keeps_the_false_positive_rate() -> None:
    labels, probs = synthetic(n=2000, overconfidence=1.0, seed=3)
    for target in (0.01, 0.05, 0.2):
        t = max_fpr_threshold(labels, probs, target)
        fpr = ((probs >= t) & (labels == 0)).sum() / (labels == 0).sum()
        assert fpr <= target
        # and it is the lowest such threshold: one safe row more would break the target
        assert (((probs >= t - 1e-3) & (labels == 0)).sum() / (labels == 0).sum()) >= fpr
    assert max_fpr_threshold(np.ones(5), np.linspace(0, 1, 5), 0.1) == 0.5  # no safe rows: default


def test_choose_thresholds_weights_sources_per_policy() -> None:
    rows = [
        Example(text=str(i), label=i % 2, policy_id="p" if i < 100 else "q", source="a" if i % 3 else "b")
        for i in range(200)
    ]
    scores = np.linspace(0, 1, 200)
    out = choose_thresholds(rows, scores, ThresholdTarget("max_fpr", 0.1))
    assert set(out) == {"p", "q"} and all(0 < t < 1 for t in out.values())


# -- the command, on a real (tiny) exported folder ---------------------------------------------------


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random model whose scores vary from prompt to prompt (larger initial weights)."""
    return build_tiny_model_folder(
        tmp_path_factory.mktemp("varied") / "model", max_length=128, stride=32, seed=2, initializer_range=0.5
    )


def _raw(model: OnnxModel, policy_id: str, text: str) -> float:
    policy = load_policies(DEFAULT_POLICIES_DIR)[policy_id]
    w = model.encoder.encode(policy, text)
    return float(
        np.max(
            model.run(pad_batch(w.input_ids, model.pad_id), pad_batch(w.attention_mask), pad_batch(w.token_type_ids))
        )
    )


def test_calibrate_command_rewrites_the_folder_atomically(varied_model: Path, tmp_path: Path) -> None:
    model = OnnxModel.load(varied_model, threads=1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        pid = ("toxicity", "prompt_injection")[i % 2]
        text = f"sample prompt number {i} " + " ".join(
            rng.choice(["cats", "bombs", "taxes", "hello", "ignore", "rules"], 4)
        )
        # labels follow the raw score, less sharply than the score says: over-confident model
        p = _raw(model, pid, text)
        label = int(rng.random() < 0.5 + 0.3 * (p - 0.5) / max(abs(p - 0.5), 1e-6) * min(abs(p - 0.5) * 4, 1))
        rows.append(
            json.dumps({"text": text, "label": label, "policy_id": pid, "source": "synthetic" if i % 3 else "other"})
        )
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(rows) + "\n")
    onnx_sha = sha256_file(varied_model / "model.onnx")

    policies = load_policies(DEFAULT_POLICIES_DIR)
    options = ReleaseOptions(ThresholdTarget("max_fpr", 0.2), threads=1)
    summary = finalize(varied_model, varied_model, read_examples(validation), policies, options).summary()
    assert summary["rows"] == 120 and summary["temperature"] > 0
    manifest = read_manifest(varied_model)
    assert manifest.calibration is not None and manifest.calibration.temperature == pytest.approx(
        summary["temperature"], rel=1e-3
    )
    assert manifest.threshold_target == {"kind": "max_fpr", "max_fpr": 0.2}
    assert manifest.policies["toxicity"].threshold == pytest.approx(summary["thresholds"]["toxicity"], abs=1e-4)
    assert sha256_file(varied_model / "model.onnx") == onnx_sha  # same model file, same version
    assert (varied_model / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (varied_model / "CARD.md").read_text()
    assert "## Calibration" in card and "reliability.png" in card and "ECE" in card and "false-positive rate" in card
    assert not [p for p in varied_model.parent.iterdir() if p.name.startswith(".tmp-")]
    load_and_validate(varied_model, threads=1)  # the service still takes it

    # Idempotent: raw scores never include the calibration.
    again = finalize(varied_model, varied_model, read_examples(validation), policies, options).summary()
    assert again["temperature"] == pytest.approx(summary["temperature"], rel=1e-3)


def test_release_with_heldout_rows_bounds_fpr_and_reports_out_of_source(varied_model: Path, tmp_path: Path) -> None:
    """Held-out rows: thresholds keep FPR <= the target on each held-out benign source (tune
    half), and the manifest and card carry the test half's table and summary."""
    from training.data.heldout import half_of
    from training.eval.heldout import halves

    policies = load_policies(DEFAULT_POLICIES_DIR)
    rng = np.random.default_rng(1)
    words = ["cats", "bombs", "taxes", "hello", "ignore", "rules", "garden", "report"]
    validation = [
        Example(f"validation prompt {i} " + " ".join(rng.choice(words, 5)), i % 2, "toxicity", "val") for i in range(80)
    ]
    heldout = [
        Example(f"chat prompt {i} " + " ".join(rng.choice(words, 6)), 0, "toxicity", "oasst_prompts")
        for i in range(120)
    ]
    heldout += [
        Example(f"hateful post {i} " + " ".join(rng.choice(words, 6)), 1, "toxicity", "hate") for i in range(60)
    ]
    out = tmp_path / "released"
    options = ReleaseOptions(ThresholdTarget("max_fpr", 0.05), threads=1)
    release = finalize(varied_model, out, validation, policies, options, heldout=heldout)
    assert release.heldout is not None
    held = read_manifest(out).training["heldout"]
    assert held["sources"] == [PREFIX_SOURCE, "hate", "oasst_prompts"] and 0.0 <= held["summary"] <= 1.0
    # the bound holds on the tune half it was chosen on
    model = OnnxModel.load(out, threads=1)
    from service.model.calibration import apply_calibration

    tune = [ex for ex in heldout if half_of(ex.text) == "tune" and ex.label == 0]
    raw = np.array([_raw(model, "toxicity", ex.text) for ex in tune])
    flagged = apply_calibration(read_manifest(out).calibration, raw) >= release.thresholds["toxicity"]
    assert flagged.mean() <= 0.05
    _tune, test = halves(heldout)
    # figures come from the test half only (and the prefix sweep built from it)
    assert sum(c["n"] for c in held["cells"] if c["source"] != PREFIX_SOURCE) == len(test)
    assert "## Out of source" in (out / "CARD.md").read_text()


def test_release_records_ordered_sensitivity_levels(varied_model: Path, tmp_path: Path) -> None:
    """The levels target writes strict <= balanced <= permissive per policy, serves balanced,
    and the card tables every level."""
    policies = load_policies(DEFAULT_POLICIES_DIR)
    rng = np.random.default_rng(2)
    words = ["cats", "bombs", "taxes", "hello", "ignore", "rules", "garden", "report"]
    validation = [
        Example(f"validation prompt {i} " + " ".join(rng.choice(words, 5)), i % 2, "toxicity", "val") for i in range(80)
    ]
    heldout = [Example(f"chat {i} " + " ".join(rng.choice(words, 6)), 0, "toxicity", "chats") for i in range(120)]
    heldout += [Example(f"attack {i} " + " ".join(rng.choice(words, 6)), 1, "toxicity", "hate") for i in range(60)]
    out = tmp_path / "levels"
    options = ReleaseOptions(ThresholdTarget.parse("levels"), threads=1)
    release = finalize(varied_model, out, validation, policies, options, heldout=heldout)
    entry = read_manifest(out).policies["toxicity"]
    assert set(entry.sensitivity) == {"strict", "balanced", "permissive"}
    assert entry.sensitivity["strict"] <= entry.sensitivity["balanced"] <= entry.sensitivity["permissive"]
    assert entry.threshold == pytest.approx(entry.sensitivity["balanced"], abs=1e-6)
    assert release.levels is not None and set(release.levels) == {"strict", "balanced", "permissive"}
    card = (out / "CARD.md").read_text()
    assert all(f"### `{level}`" in card for level in ("strict", "balanced", "permissive"))
    assert "| strict % | balanced % | permissive % |" in card  # each level's per-source figures
