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
from training.data.heldout import half_of
from training.data.rows import Example
from training.eval.heldout import (
    DEFAULT_LEVEL,
    HEADER,
    LEVELS,
    POLICY_HEADER,
    HeldoutResult,
    LevelCap,
    cells_table,
    heldout_result,
    levels_cells_table,
    policy_table,
    prefixed_rows,
    sensitivity_thresholds,
)
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
    levels: dict[str, HeldoutResult] | None = None

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
    manifest: Manifest,
    policies: dict[str, Policy],
    rep: dict[str, dict[str, Any]],
    thresholds: dict[str, float],
    levels: dict[str, dict[str, float]] | None = None,
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
                **(
                    {"sensitivity": {name: round(t[pid], 6) for name, t in levels.items() if pid in t}}
                    if levels
                    else {}
                ),
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


def _md(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def heldout_section(result: dict[str, Any], levels: dict[str, dict[str, Any]] | None = None) -> str:
    """The card's out-of-source tables (test half): per sensitivity level, and every cell at ``balanced``."""
    out = (
        "\n## Out of source (what decides promotion)\n\n"
        f"Sources never trained on: {', '.join(result['sources'])}. {result['protocol']}. "
        f"Not binding (the gateway routes do not judge system prompts by default): "
        f"{', '.join(result.get('non_binding_sources', [])) or 'none'}. "
        f"Summary at `{DEFAULT_LEVEL}`: **{result['summary']:.4f}** (flagging nothing or everything scores 0.5).\n"
    )
    for name, res in (levels or {DEFAULT_LEVEL: result}).items():
        cap = LEVELS.get(name)
        caps = (
            f" (tune half: pooled benign FPR ≤ {100 * cap.pooled:g} %, each source ≤ {100 * cap.per_source:g} %)"
            if cap
            else ""
        )
        out += f"\n### `{name}`{caps}: summary {res['summary']:.4f}\n\n" + _md(POLICY_HEADER, policy_table(res)) + "\n"
    out += (
        "\n'rows within 0.01': the share of the policy's held-out rows whose score lies within 0.01 of the "
        "threshold; where it is small, no verdict turns on the third decimal.\n"
    )
    if levels and len(levels) > 1:
        header, rows = levels_cells_table(levels)
        out += "\n### What each level implies per held-out source (recall on unsafe, FPR on benign)\n\n"
        out += _md(header, rows) + "\n"
    out += f"\n### Every held-out cell at `{DEFAULT_LEVEL}`\n\n" + _md(HEADER, cells_table(result)) + "\n"
    return out


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
    test_rows = heldout_test_rows(heldout)
    rows, scores = score_heldout(folder, test_rows, served, manifest.calibration, threads)
    thresholds = {pid: manifest.policies[pid].threshold for pid in served}
    return heldout_result(rows, scores, thresholds)


def levels_of_folder(
    folder: Path, heldout: list[Example], policies: dict[str, Policy], threads: int = 0
) -> dict[str, HeldoutResult] | None:
    """A released folder on the held-out test half at every sensitivity level: the levels its
    manifest records, or, for a folder released before levels existed, levels chosen now on the
    tune half by the same rule (so two models are compared at the same operating points)."""
    manifest = read_manifest(folder)
    served = {pid: p for pid, p in policies.items() if pid in manifest.policies}
    if not served:
        return None
    tune_rows = [ex for ex in heldout if half_of(ex.text) == "tune" and ex.policy_id in served]
    rows, scores = score_heldout(folder, tune_rows + heldout_test_rows(heldout), served, manifest.calibration, threads)
    n = len(tune_rows)
    recorded = all(manifest.policies[pid].sensitivity for pid in served)
    if recorded:
        chosen = {lv: {pid: manifest.policies[pid].threshold_at(lv) for pid in served} for lv in LEVELS}
    else:
        fallback = {pid: manifest.policies[pid].threshold for pid in served}
        chosen = sensitivity_thresholds([], np.array([]), rows[:n], scores[:n], fallback)
    return {lv: heldout_result(rows[n:], scores[n:], t) for lv, t in chosen.items()}


def heldout_test_rows(heldout: list[Example]) -> list[Example]:
    """The test half plus its benign-prefix sweep: the rows every out-of-source figure is reported on."""
    test = [ex for ex in heldout if half_of(ex.text) == "test"]
    return test + prefixed_rows(test)


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
    by_level: dict[str, HeldoutResult] | None = None
    level_thresholds: dict[str, dict[str, float]] | None = None
    if heldout:
        tune_rows = [ex for ex in heldout if half_of(ex.text) == "tune"]
        hrows, hscores = score_heldout(
            src, tune_rows + heldout_test_rows(heldout), policies, fit.manifest_entry(), options.threads
        )
        n_tune = sum(1 for ex in tune_rows if ex.policy_id in policies)  # score_heldout keeps order
        tune_part, tune_scores = hrows[:n_tune], hscores[:n_tune]
        test_part, test_scores = hrows[n_tune:], hscores[n_tune:]
        if target.kind in ("levels", "max_fpr"):
            caps = LEVELS
            if target.kind == "max_fpr" and target.max_fpr is not None:  # one level at the stated pooled cap
                caps = {DEFAULT_LEVEL: LevelCap(target.max_fpr, max(LEVELS[DEFAULT_LEVEL].per_source, target.max_fpr))}
            level_thresholds = sensitivity_thresholds(rows, fit.calibrated, tune_part, tune_scores, thresholds, caps)
            thresholds = level_thresholds[DEFAULT_LEVEL]
            by_level = {name: heldout_result(test_part, test_scores, t) for name, t in level_thresholds.items()}
            held = by_level[DEFAULT_LEVEL]
        else:
            held = heldout_result(test_part, test_scores, thresholds)
    rep = report(rows, fit.calibrated, thresholds)  # what the service answers: calibrated scores
    parity = _parity(reference, src, rows, policies, fit, thresholds, options) if reference is not None else None
    manifest = read_manifest(src)
    with staged_dir(out, copy_from=src) as staging:
        reliability_diagram(staging / DIAGRAM_FILE, fit, f"{manifest.name}@{manifest.version}: validation reliability")
        _policy_entries(manifest, policies, rep, thresholds, level_thresholds)
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
            **(
                {"heldout_levels": {name: r.as_dict()["policies"] for name, r in by_level.items()}}
                if by_level is not None
                else {}
            ),
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
            + (
                heldout_section(
                    held.as_dict(), {n: r.as_dict() for n, r in by_level.items()} if by_level is not None else None
                )
                if held is not None
                else ""
            )
            + options.card_extra
        )
        write_text_atomic(staging / "CARD.md", card)
    return Release(out, manifest, rep, fit, target, thresholds, skipped, card, held, by_level)


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
