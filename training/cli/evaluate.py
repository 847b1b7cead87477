"""``python -m training evaluate`` (any model on any labelled JSONL) and ``table`` (the pipeline's closing table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from service.policy import DEFAULT_POLICIES_DIR, Policy, load_policies
from training import paths
from training.cli.common import RUN_HELP
from training.io import write_json_atomic, write_text_atomic

# The scorer (torch, onnxruntime) is imported inside the commands: `--help` must stay instant.


def checkpoint_overrides(model: Path, max_length: int | None, template: str) -> dict[str, Any]:
    """Window / template overrides for a checkpoint (an ONNX folder's manifest always decides)."""
    from training.model.modeling import MTG_TEMPLATE, TASKGUARD_TEMPLATE

    if (model / "manifest.json").exists():
        return {}
    if template not in ("auto", "mtg", "taskguard"):
        raise typer.BadParameter("auto, mtg or taskguard", param_hint="--template")
    out: dict[str, Any] = {"max_length": max_length} if max_length else {}
    if template != "auto":
        out["template"] = MTG_TEMPLATE if template == "mtg" else TASKGUARD_TEMPLATE
    return out


def evaluate(
    model: Path = typer.Argument(..., help="Checkpoint folder (config.json) or exported model folder (manifest.json)."),
    data_file: Path = typer.Argument(..., help="JSONL with text and label (and policy_id unless --policy)."),
    policy: str = typer.Option(None, help="Map every row to this policy."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR),
    threshold: float = typer.Option(0.5, help="Unsafe if the score is at least this."),
    batch_size: int = typer.Option(1, help="1: per-request latency; larger: batch-amortised throughput."),
    limit: int = typer.Option(0, help="Score only the first N rows (0: all)."),
    max_length: int = typer.Option(None, help="Checkpoints only: window override (default: its uniguard.json)."),
    template: str = typer.Option("auto", help="Checkpoints only: auto (its uniguard.json, else mtg), mtg or taskguard."),
    out: Path = typer.Option(None, help="Folder for report.json + report.md (default runs/eval/<model>-<data>)."),
) -> None:
    """Precision, recall, F1, FPR, ROC-AUC and p50/p95 latency per policy (raw scores); table, JSON + Markdown."""
    from training.data.rows import read_test_rows
    from training.eval.report import COLUMNS, evaluate_path, markdown_report
    from training.ui import Reporter, print_table

    policies: dict[str, Policy] = load_policies(policies_dir)
    rows = read_test_rows(data_file, policies, policy, limit or None)
    with Reporter().task(f"score {model.name}") as update:
        result = evaluate_path(model, rows, policies, threshold=threshold, batch_size=batch_size, data_name=str(data_file),
                               progress=lambda d, t: update(d, t, ""), **checkpoint_overrides(model, max_length, template))
    print_table(f"{result['scorer']} on {data_file.name} (threshold {threshold})", ["policy", *COLUMNS],
                [(pid, *(m.get(c) for c in COLUMNS)) for pid, m in result["policies"].items()])
    target = out or paths.RUNS / "eval" / f"{model.resolve().name}-{data_file.stem}"
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "report.json", result)
    write_text_atomic(target / "report.md", markdown_report(result))
    typer.echo(f"wrote {target}/report.json and report.md")


def table(
    run: str = typer.Option("issue4", help=RUN_HELP),
    holdout: str = typer.Option("tax_advice"),
    out: Path = typer.Option(None, help="Markdown file (default runs/<run>/table.md)."),
) -> None:
    """The closing table (validation F1 / ROC-AUC per family and policy, zero-shot row) from checkpoints.json."""
    from training.eval.report import closing_table

    text = closing_table(paths.RUNS / run, sorted(load_policies(DEFAULT_POLICIES_DIR)), holdout or None)
    target = out or paths.RUNS / run / "table.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, text)
    typer.echo(text)
