"""``python -m training export`` / ``calibrate`` / ``add-fp16``: model folders through the one release step."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR, load_policies
from training import paths
from training.cli.common import QUANTIZATION_HELP, PoliciesDirOption, command_line, parse_quantization
from training.data.rows import read_examples

if TYPE_CHECKING:
    from training.eval.thresholds import ThresholdTarget

# Export and release (torch, optimum, onnxruntime) are imported inside the commands: `--help` must stay instant.
TARGET_HELP = "Per-policy threshold target: best-f1, or max-fpr:<rate> (e.g. max-fpr:0.05)."


def parse_target(text: str) -> ThresholdTarget:
    from training.eval.thresholds import ThresholdTarget

    try:
        return ThresholdTarget.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold-target") from exc


def run_validation(checkpoint: Path, depth: int = 4) -> Path | None:
    """``runs/<run>/data/validation.jsonl`` of the run a pipeline checkpoint sits in (None outside a run)."""
    for folder in [checkpoint.resolve(), *checkpoint.resolve().parents][: depth + 1]:
        if (folder / "data" / "validation.jsonl").is_file():
            return folder / "data" / "validation.jsonl"
    return None


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A pipeline checkpoint folder.")],
    out: Annotated[Path, typer.Argument(help="Model folder to write (what the service and `evaluate` load).")],
    validation: Annotated[
        Path | None,
        typer.Option(
            help="Validation rows for calibration and thresholds "
            "(default: the checkpoint's runs/<run>/data/validation.jsonl)."
        ),
    ] = None,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    quantize: Annotated[
        bool,
        typer.Option(
            help="Fused graph, int8 with per-token activation scales (the CPU format); --no-quantize: fused fp32."
        ),
    ] = True,
    quantization: Annotated[str, typer.Option(help=QUANTIZATION_HELP)] = "",
    threshold_target: Annotated[str, typer.Option(help=TARGET_HELP)] = "best-f1",
    threads: Annotated[int, typer.Option(help="onnxruntime threads for scoring (0: all cores).")] = 0,
) -> None:
    """Export a checkpoint to ONNX and release it: calibrated, thresholds, manifest (template, window), card."""
    from training.model.checkpoints import read_meta, template_of
    from training.release.export import ExportSpec
    from training.release.finalize import ReleaseOptions, release_checkpoint

    target = parse_target(threshold_target)
    validation = validation or run_validation(checkpoint)
    if validation is None or not validation.is_file():
        raise typer.BadParameter(
            f"no validation split found for {checkpoint}; pass --validation", param_hint="--validation"
        )
    meta = read_meta(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".export-{out.name}-", dir=out.parent) as work:
        release = release_checkpoint(
            checkpoint,
            out,
            read_examples(validation),
            load_policies(policies_dir),
            export_dir=Path(work) / "export",
            spec=ExportSpec(
                f"uniguard-{meta.get('family', 'checkpoint')}",
                str(meta.get("init", "")),
                int(meta.get("max_length", 128)),
                int(meta.get("stride", 32)),
                command_line(),
                template_of(meta),
                quantize=quantize,
                quantization=parse_quantization(quantization),
                data_hashes=meta.get("data_hashes", {}),
                training={"family": meta.get("family"), "policy": meta.get("policy")},
            ),
            options=ReleaseOptions(target, threads=threads),
        )
    manifest = release.manifest
    typer.echo(
        f"wrote {out} ({manifest.files[0].precision}, template {manifest.input_template.model_dump()}, "
        f"T = {release.fit.temperature:.3f}, mean validation F1 {release.mean_f1:.4f})"
    )


def calibrate(
    model_dir: Annotated[
        Path, typer.Option(help="Exported model folder to calibrate in place.")
    ] = paths.DEFAULT_MODEL_DIR,
    validation: Annotated[
        Path, typer.Option(help="Validation rows (JSONL: text, label, policy_id, source).")
    ] = paths.DEFAULT_RUN_DIR / "validation.jsonl",
    policies_dir: PoliciesDirOption = DEFAULT_POLICIES_DIR,
    threshold_target: Annotated[str, typer.Option(help=TARGET_HELP)] = "best-f1",
    threads: Annotated[int, typer.Option(help="onnxruntime threads for scoring (0: all cores).")] = 0,
) -> None:
    """Fit temperature scaling on validation scores, choose per-policy thresholds on the calibrated
    scores, and rewrite manifest.json, CARD.md and reliability.png of MODEL_DIR atomically."""
    from training.release.finalize import ReleaseOptions, finalize

    for path, hint in ((model_dir, "--model-dir"), (validation, "--validation")):
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=hint)
    target = parse_target(threshold_target)
    options = ReleaseOptions(target, threads=threads)
    release = finalize(model_dir, model_dir, read_examples(validation), load_policies(policies_dir), options)
    typer.echo(json.dumps(release.summary(), indent=2))


def add_fp16(
    model_dir: Annotated[Path, typer.Argument(help="A released model folder.")],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint it was exported from.")],
) -> None:
    """Add the fp16 CUDA file (model_fp16.onnx) to a model folder (Dockerfile.gpu)."""
    from training.release.export import add_fp16_file

    typer.echo(add_fp16_file(model_dir, checkpoint).model_dump_json(include={"files"}, indent=2))
