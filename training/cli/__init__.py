"""``python -m training``: one typer app, one command (or group) per stage of the paper.

data                      splits of a run (runs/<run>/data)
train taskguard|mtg|default   the one training loop, per stage (default: `make model`)
table                     the pipeline's closing table
evaluate                  any checkpoint or model folder on any labelled JSONL
quant-study               serving-graph formats of one model: speed, fidelity, batch invariance
capacity-study            two base encoders at one training budget: out-of-source figures, latency
precision-study           fp32 against bf16 autocast training: held-out figures and step time
export                    checkpoint -> released model folder (the one release step)
calibrate                 re-release a model folder in place (temperature, thresholds, card)
merge-search              model merging search; the winner goes through the release step
sdg generate              synthetic data from written policies
pipeline all              data -> taskguard -> mtg -> table
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from training import paths
from training.cli import data as data_cli
from training.cli import evaluate as evaluate_cli
from training.cli import merge as merge_cli
from training.cli import release as release_cli
from training.cli import sdg as sdg_cli
from training.cli import train as train_cli
from training.cli.common import RUN_HELP, defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UniGuard training pipeline: one command per stage.")
pipeline_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The paper's pipeline in one go: data -> taskguard -> mtg -> table.",
)


@app.callback()
def main() -> None:
    """UniGuard training pipeline: one command per stage."""


@pipeline_app.command("all")
def pipeline_all(
    run: Annotated[str, typer.Option(help=RUN_HELP)] = "paper",
    holdout: Annotated[str, typer.Option()] = "tax_advice",
    table_out: Annotated[Path | None, typer.Option(help="Also write the closing table here.")] = None,
) -> None:
    """data -> taskguard -> mtg -> table with default settings (resumes whatever is finished)."""
    started = time.time()
    for stage in (data_cli.data, train_cli.taskguard, train_cli.mtg):
        t0 = time.time()
        settings = defaults(stage) | {"run": run}
        if "holdout" in settings:
            settings["holdout"] = holdout
        stage(**settings)
        typer.echo(f"{stage.__name__}: {time.time() - t0:.0f} s")
    evaluate_cli.table(run=run, holdout=holdout, out=None)
    if table_out:
        table_out.write_text((paths.RUNS / run / "table.md").read_text(encoding="utf-8"), encoding="utf-8")
    typer.echo(f"all stages: {(time.time() - started) / 60:.1f} min")


app.command("data")(data_cli.data)
app.add_typer(train_cli.app, name="train")
app.command("table")(evaluate_cli.table)
app.command("evaluate")(evaluate_cli.evaluate)
app.command("quant-study")(evaluate_cli.quant_study)
app.command("capacity-study")(evaluate_cli.capacity_study)
app.command("precision-study")(evaluate_cli.precision_study)
app.command("zero-shot-spread")(evaluate_cli.zero_shot_spread)
app.command("export")(release_cli.export)
app.command("calibrate")(release_cli.calibrate)
app.command("add-fp16")(release_cli.add_fp16)
app.command("merge-search")(merge_cli.merge_search)
app.add_typer(sdg_cli.app, name="sdg")
app.add_typer(pipeline_app, name="pipeline")
