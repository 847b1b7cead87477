"""The offline pipeline, one command per stage (``python -m training.cli --help``)."""

from __future__ import annotations

from pathlib import Path

import typer

from service.policy import DEFAULT_POLICIES_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UniGuard training pipeline.")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parent / "examples"


@app.callback()
def main() -> None:
    """UniGuard training pipeline: one command per stage."""


@app.command("build-default")
def build_default_cmd(
    data_dir: Path = typer.Option(DEFAULT_DATA, help="Folder of the public JSONL files (../shared/data)."),
    examples_dir: Path = typer.Option(EXAMPLES, help="Folder of hand-written example JSONL files."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR, help="Folder of policy YAML files."),
    out: Path = typer.Option(REPO / "models" / "default", help="Model folder to write."),
    run_dir: Path = typer.Option(REPO / "runs" / "default", help="Work folder; a rerun resumes from it."),
    max_length: int = typer.Option(128, help="Tokens per window (instruction + prompt)."),
    stride: int = typer.Option(32, help="Tokens shared by consecutive windows of a long prompt."),
    epochs: float = typer.Option(1.0, help="Passes over the training split (1 takes ~20 min on 2 cores)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(8e-5),
    seed: int = typer.Option(13),
    force: bool = typer.Option(False, help="Replace the output even if its validation F1 is higher."),
    threshold_target: str = typer.Option("best-f1", help="Per-policy threshold target: best-f1, or max-fpr:<rate>."),
) -> None:
    """Train, calibrate and export the shipped multi-policy model (CPU, ~25 min on 2 cores)."""
    from training.build_default import build_default
    from training.data import DataError
    from training.trainer import TrainConfig

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder of JSONL files", param_hint="--data-dir")
    try:
        build_default(data_dir, examples_dir, policies_dir, out, run_dir, max_length=max_length, stride=stride,
                      cfg=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed), force=force,
                      threshold_target=threshold_target)
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command("calibrate")
def calibrate_cmd(
    model_dir: Path = typer.Option(REPO / "models" / "default", help="Exported model folder to calibrate in place."),
    validation: Path = typer.Option(REPO / "runs" / "default" / "validation.jsonl", help="Validation rows (JSONL: text, label, policy_id, source)."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR, help="Folder of policy YAML files."),
    threshold_target: str = typer.Option("best-f1", help="Per-policy threshold target: best-f1, or max-fpr:<rate> (e.g. max-fpr:0.05)."),
    threads: int = typer.Option(0, help="onnxruntime threads for scoring (0: all cores)."),
) -> None:
    """Fit temperature scaling on validation scores, choose per-policy thresholds on the calibrated
    scores, and rewrite manifest.json, CARD.md and reliability.png of MODEL_DIR atomically."""
    from training.calibration import ThresholdTarget, calibrate_model_dir

    for path, hint in ((model_dir, "--model-dir"), (validation, "--validation")):
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=hint)
    try:
        target = ThresholdTarget.parse(threshold_target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold-target") from exc
    summary = calibrate_model_dir(model_dir, validation, policies_dir=policies_dir, target=target, threads=threads)
    import json

    typer.echo(json.dumps(summary, indent=2))


from training.sdg.cli import app as sdg_app  # noqa: E402  (light: the SDG command imports its work lazily)

app.add_typer(sdg_app, name="sdg")

from training.pipeline_cli import app as pipeline_app  # noqa: E402  (TaskGuard / MultiTaskGuard stages)

app.add_typer(pipeline_app, name="pipeline")

from training.merge_cli import merge_search_cmd  # noqa: E402  (UniGuard model merging search, issue 5)

app.command("merge-search")(merge_search_cmd)

if __name__ == "__main__":
    app()
