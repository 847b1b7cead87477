"""The one release step: every model folder the project writes goes through ``finalize``.

An exported folder (``training.release.export``) has weights and a manifest, but no
thresholds anyone should serve with. ``finalize`` scores the validation rows raw through the
service's own loader, fits temperature scaling, chooses each policy's threshold on the
calibrated scores for the stated target, and writes the manifest's policies, calibration and
threshold target, ``reliability.png`` and ``CARD.md`` into a copy of the folder staged next
to the output, which then replaces the output in one rename. ``model.onnx`` is never
touched, so the model's version stays, and rerunning is idempotent: onnxruntime's raw
scores never include the calibration.

Callers: ``train default`` (build-default), ``calibrate`` (a folder in place), ``export``
(a TaskGuard / MultiTaskGuard checkpoint) and ``merge-search`` (the winner).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.policy import Policy
from service.model.calibration import Calibration, apply_calibration
from service.model.manifest import MANIFEST_FILE, Manifest, PolicyEntry, read_manifest, sha256_file
from training.data.rows import Example
from training.eval.heldout import HEADER, HeldoutResult, bounded_thresholds, cells_table, halves, heldout_result
from training.eval.metrics import mean_f1, report
from training.eval.parity import Parity, measure_parity, sample_rows
from training.eval.scoring import Progress, onnx_scorer, score, torch_scorer
from training.eval.thresholds import BEST_F1, ThresholdTarget, choose_thresholds
from training.io import staged_dir, write_json_atomic, write_text_atomic
from training.release.calibrate import (
    DIAGRAM_FILE,
    CalibrationFit,
    card_section,
    fit_calibration,
    per_policy_ece,
    reliability_diagram,
)
from training.release.card import render_card
from training.release.export import ExportSpec, export_model_folder

CHECKED_FILES = ("tokenizer.json", "config.json")
log = logging.getLogger(__name__)


@dataclass
class Release:
    """What the release step wrote, and the figures it wrote them from."""

    folder: Path
    manifest: Manifest
    report: dict[str, dict[str, Any]]
    fit: CalibrationFit
    target: ThresholdTarget
    thresholds: dict[str, float]
    skipped_policies: list[str]
    card: str
    heldout: HeldoutResult | None = None

    @property
    def mean_f1(self) -> float:
        """Mean validation F1 through the service (int8 or fp32, all windows, calibrated thresholds)."""
        return mean_f1(self.report)

    def summary(self) -> dict[str, Any]:
        fit = self.fit
        return {
            "model": f"{self.manifest.name}@{self.manifest.version}",
            "rows": fit.n,
            "temperature": round(fit.temperature, 4),
            "ece_before": round(fit.ece_before, 4),
            "ece_after": round(fit.ece_after, 4),
            "ece_after_cross_fitted": round(fit.ece_after_cross_fitted, 4),
            "nll_before": round(fit.nll_before, 4),
            "nll_after": round(fit.nll_after, 4),
            "target": self.target.as_dict(),
            "thresholds": {pid: round(t, 4) for pid, t in sorted(self.thresholds.items())},
            "skipped_policies": self.skipped_policies,
            "mean_validation_f1": round(self.mean_f1, 4),
            "diagram": str(self.folder / DIAGRAM_FILE),
        }


def _policy_entries(
    manifest: Manifest, policies: dict[str, Policy], rep: dict[str, dict[str, Any]], thresholds: dict[str, float]
) -> None:
    """Every validated policy, and every policy the manifest already listed, gets its new entry."""
    for pid, policy in policies.items():
        entry = rep.get(pid)
        if entry is None and pid not in manifest.policies:
            continue
        manifest.policies[pid] = PolicyEntry.model_validate(
            {
                "threshold": round(thresholds.get(pid, manifest.default_threshold), 6),
                "description_sha256": policy.description_sha256(),
                "validation": entry["overall"] if entry else None,
                "validation_by_source": entry["by_source"] if entry else {},
            }
        )


@dataclass(frozen=True)
class ReleaseOptions:
    """How to release, beyond the folder and its validation rows.

    ``training`` is merged into the manifest's ``training`` record; ``train_rows`` (default:
    the manifest's own record) and ``minutes`` go into the card; ``card_extra`` is Markdown
    appended to the card (e.g. a merge recipe).
    """

    target: ThresholdTarget = BEST_F1
    training: dict[str, Any] | None = None
    train_rows: int | None = None
    minutes: float | None = None
    card_extra: str = ""
    threads: int = 0
    # Parity with the fp32 checkpoint (when finalize is given one): rows sampled from the
    # validation rows, and the verdict agreement below which the release fails (None: record only).
    parity_rows: int = 1000
    min_parity: float | None = None


DEFAULT_OPTIONS = ReleaseOptions()


class ParityError(RuntimeError):
    """The served file's verdicts differ from its checkpoint's on too many validation rows."""


def _parity(
    reference: Path,
    src: Path,
    rows: list[Example],
    policies: dict[str, Policy],
    fit: CalibrationFit,
    thresholds: dict[str, float],
    options: ReleaseOptions,
) -> Parity:
    manifest = read_manifest(src)
    ref = torch_scorer(
        reference,
        template=manifest.input_template,
        max_length=manifest.max_length,
        stride=manifest.stride,
        threads=options.threads,
    )
    sample = sample_rows(rows, options.parity_rows)
    calibration = fit.manifest_entry()
    cut = np.array([thresholds.get(ex.policy_id, 0.5) for ex in sample])

    def verdicts(raw: np.ndarray) -> np.ndarray:
        return np.asarray(apply_calibration(calibration, raw)) >= cut

    parity = measure_parity(ref, onnx_scorer(src, options.threads), sample, policies, verdicts)
    log.info(parity.line())
    if options.min_parity is not None and parity.verdict_agreement < options.min_parity:
        raise ParityError(f"{parity.line()}; at least {100 * options.min_parity:.1f} % required")
    return parity


def heldout_section(result: dict[str, Any]) -> str:
    """The card's out-of-source table (test half, at the served thresholds)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in cells_table(result)]
    return (
        "\n## Out of source (what decides promotion)\n\n"
        f"Sources never trained on: {', '.join(result['sources'])}. {result['protocol']}. "
        f"Summary (mean of recall on unsafe cells and 1 - FPR on benign cells): **{result['summary']:.4f}**; "
        f"worst FPR {result['worst_fpr']}, worst recall {result['worst_recall']}. The FPR column is what each "
        "policy's threshold implies on each held-out benign source.\n\n" + "\n".join(lines) + "\n"
    )


def score_heldout(
    src: Path,
    heldout: list[Example],
    policies: dict[str, Policy],
    calibration: Calibration | None,
    threads: int = 0,
    progress: Progress | None = None,
) -> tuple[list[Example], np.ndarray]:
    """Held-out rows of ``policies`` and their calibrated scores through the service's loader."""
    rows = [ex for ex in heldout if ex.policy_id in policies]
    raw, _ = score(onnx_scorer(src, threads), rows, policies, progress=progress)
    return rows, np.asarray(apply_calibration(calibration, raw))


def heldout_of_folder(
    folder: Path, heldout: list[Example], policies: dict[str, Policy], threads: int = 0
) -> HeldoutResult | None:
    """A released folder (its own calibration and thresholds) on the held-out test half; None if
    it serves none of the policies. Promotion compares candidate and current default by this."""
    manifest = read_manifest(folder)
    served = {pid: p for pid, p in policies.items() if pid in manifest.policies}
    if not served:
        return None
    rows, scores = score_heldout(folder, heldout, served, manifest.calibration, threads)
    _tune, test = halves(rows)
    thresholds = {pid: manifest.policies[pid].threshold for pid in served}
    return heldout_result([rows[i] for i in test], scores[test], thresholds)


def finalize(
    src: Path,
    out: Path,
    examples: list[Example],
    policies: dict[str, Policy],
    options: ReleaseOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
    reference: Path | None = None,
    heldout: list[Example] | None = None,
) -> Release:
    """Release the exported folder ``src`` as ``out`` (``out`` may be ``src``: calibrated in place).

    ``examples`` are the validation rows; rows of policies not in ``policies`` are skipped.
    ``reference``: the fp32 checkpoint ``src`` was exported from; its parity with the served
    file is measured, recorded in the manifest and card, and gated by ``options.min_parity``.
    ``heldout``: rows of evaluation-only sources (``training.eval.heldout``): with a
    ``max-fpr`` target the FPR bound holds on each held-out benign source (tune half), and
    the test half's table goes into the manifest and the card.
    """
    src, out = Path(src), Path(out)
    skipped = sorted({ex.policy_id for ex in examples if ex.policy_id not in policies})
    rows = [ex for ex in examples if ex.policy_id in policies]
    if not rows:
        raise ValueError(f"no validation rows for the policies {sorted(policies)}")
    raw, _ = score(onnx_scorer(src, options.threads), rows, policies, progress=progress)  # the service's loader
    fit = fit_calibration(np.array([ex.label for ex in rows], dtype=int), raw)
    target = options.target
    thresholds = choose_thresholds(rows, fit.calibrated, target)
    held: HeldoutResult | None = None
    if heldout:
        hrows, hscores = score_heldout(src, heldout, policies, fit.manifest_entry(), options.threads)
        tune, test = halves(hrows)
        if target.max_fpr is not None:
            tune_rows = [hrows[i] for i in tune]
            thresholds = bounded_thresholds(rows, fit.calibrated, tune_rows, hscores[tune], thresholds, target.max_fpr)
        held = heldout_result([hrows[i] for i in test], hscores[test], thresholds)
    rep = report(rows, fit.calibrated, thresholds)  # what the service answers: calibrated scores
    parity = _parity(reference, src, rows, policies, fit, thresholds, options) if reference is not None else None
    manifest = read_manifest(src)
    with staged_dir(out, copy_from=src) as staging:
        reliability_diagram(staging / DIAGRAM_FILE, fit, f"{manifest.name}@{manifest.version}: validation reliability")
        _policy_entries(manifest, policies, rep, thresholds)
        manifest.calibration = fit.manifest_entry()
        manifest.threshold_target = target.as_dict()
        if not manifest.checksums:  # the service refuses a folder whose tokenizer or config was swapped
            manifest.checksums = {f: sha256_file(staging / f) for f in CHECKED_FILES if (staging / f).exists()}
        manifest.training = {
            **manifest.training,
            **(options.training or {}),
            "val_f1_service": round(mean_f1(rep), 6),
            "service_precision": manifest.files[0].precision,
            **({"parity": parity.as_dict()} if parity is not None else {}),
            **({"heldout": held.as_dict()} if held is not None else {}),
        }
        manifest = Manifest.model_validate(manifest.model_dump())
        write_json_atomic(staging / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
        recorded = manifest.training.get("train_rows")
        train_rows = (
            options.train_rows if options.train_rows is not None else recorded if isinstance(recorded, int) else 0
        )
        card = (
            render_card(
                manifest,
                rep,
                validation_rows=len(rows),
                train_rows=train_rows,
                minutes=options.minutes,
                calibration=card_section(fit, target, per_policy_ece(rows, fit)),
            )
            + (f"\n## Served file against its checkpoint\n\n{parity.line()}.\n" if parity is not None else "")
            + (heldout_section(held.as_dict()) if held is not None else "")
            + options.card_extra
        )
        write_text_atomic(staging / "CARD.md", card)
    return Release(out, manifest, rep, fit, target, thresholds, skipped, card, held)


def release_checkpoint(
    checkpoint: Path,
    out: Path,
    examples: list[Example],
    policies: dict[str, Policy],
    *,
    export_dir: Path,
    spec: ExportSpec,
    options: ReleaseOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
    heldout: list[Example] | None = None,
) -> Release:
    """Export ``checkpoint`` to ``export_dir`` (kept: the run's record), then ``finalize`` it as ``out``."""
    export_model_folder(checkpoint, export_dir, **spec.as_kwargs())
    return finalize(export_dir, out, examples, policies, options, progress, reference=checkpoint, heldout=heldout)
