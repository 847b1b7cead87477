"""``python -m training merge-search``: the UniGuard model-merging stage (search, then release the winner)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR
from training import paths
from training.cli.common import PoliciesDirOption, command_line
from training.cli.common import csv as _split
from training.cli.release import parse_target
from training.io import write_json_atomic, write_text_atomic
from training.search.log import LogMismatch
from training.ui import console, progress_bar

# The search (torch, peft) is imported inside the command: `--help` must stay instant.


def merge_search(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Checkpoint folders (save_pretrained) and/or checkpoints index JSON files.")
    ],
    validation: Annotated[
        Path, typer.Option("--validation", help="Validation JSONL (text, label, policy_id, source).")
    ],
    name: Annotated[str, typer.Option(help="Model name; the winner is written to models/<name>/.")] = "uniguard",
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy", help="Policy id(s) to merge for (repeat or comma-separate; default: all in the file)."
        ),
    ] = None,
    policies_dir: PoliciesDirOption = DEFAULT_POLICIES_DIR,
    base: Annotated[
        Path | None,
        typer.Option(
            help="θ_base for task vectors (default: the nearest checkpoint all top-k sources were "
            "fine-tuned from, e.g. GIP for MultiTaskGuard fine-tunes, else the pretrained encoder)."
        ),
    ] = None,
    methods: Annotated[
        list[str] | None, typer.Option("--methods", help="soup,ties,dare_linear,dare_ties,slerp (default: all).")
    ] = None,
    strategies: Annotated[
        list[str] | None, typer.Option("--strategies", help="random,egreedy,ucb,thompson (default: all).")
    ] = None,
    subsets: Annotated[
        list[str] | None,
        typer.Option("--subsets", help="Merge types: all,attention,attention_output,no_head (default: all four)."),
    ] = None,
    subsets_file: Annotated[
        Path | None, typer.Option(help="YAML/JSON {name: {include: [regex], exclude: [regex]}} adding subsets.")
    ] = None,
    iterations: Annotated[int, typer.Option(help="Trials per method × strategy.")] = 50,
    top_k: Annotated[int, typer.Option(help="Sources merged: the k best by validation F1 (at most 6).")] = 6,
    density: Annotated[float, typer.Option(help="TIES: fraction of each task vector kept by magnitude.")] = 0.5,
    drop_rate: Annotated[float, typer.Option(help="DARE: drop probability p.")] = 0.5,
    lam: Annotated[float, typer.Option("--lambda", help="Task-vector scale λ.")] = 1.0,
    reward: Annotated[
        str, typer.Option(help="Bandit reward: rank (quantile of F1 among trials so far) or raw (F1).")
    ] = "rank",
    seed: Annotated[int, typer.Option()] = 13,
    max_rows: Annotated[
        int, typer.Option(help="Stratified subsample of validation rows for the search (0: all); export uses all.")
    ] = 0,
    max_windows: Annotated[
        int,
        typer.Option(
            help="Windows per row scored in the search (0: all, as served; 1: first window only, "
            "about 2x faster on the shipped validation split); export always scores all."
        ),
    ] = 0,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per window (default: what the sources were trained with, else 128).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="Tokens shared by consecutive windows (default: the sources', else 32).")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0: all cores).")] = 0,
    run_dir: Annotated[
        Path | None, typer.Option(help="Work folder (trial log, winner checkpoint); default runs/merge-<name>.")
    ] = None,
    log: Annotated[
        Path | None, typer.Option(help="Trial log JSONL (default <run-dir>/trials.jsonl); rerun to resume.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Model folder to write (default models/<name>).")] = None,
    export: Annotated[bool, typer.Option(help="Export the winner (ONNX + manifest) after the search.")] = True,
    quantize: Annotated[
        bool, typer.Option(help="int8 ONNX (the CPU serving format); --no-quantize keeps fp32.")
    ] = True,
    promote: Annotated[
        bool, typer.Option(help="Also replace models/default if the winner beats it on the default's policies.")
    ] = False,
    threshold_target: Annotated[
        str, typer.Option(help="Per-policy threshold target of the release: best-f1, or max-fpr:<rate>.")
    ] = "best-f1",
) -> None:
    """Model merging search (UniGuard): merge the top-k checkpoints with every method × strategy, export the best."""
    from training.merging.checkpoints import CheckpointIndexError, resolve_sources
    from training.merging.params import MergeParams
    from training.merging.subsets import SubsetFileError, load_subsets
    from training.release.finalize import ReleaseOptions
    from training.release.promote import promote as promote_folder
    from training.search.report import markdown, print_summary
    from training.search.run import SearchSettings, load_validation, run_search
    from training.search.winner import export_winner

    started = time.time()
    target = parse_target(threshold_target)
    if (out or paths.MODELS / name).resolve() == paths.DEFAULT_MODEL_DIR.resolve():
        raise typer.BadParameter(
            "write the merge to its own folder; use --promote to replace models/default", param_hint="--name/--out"
        )
    run_dir = run_dir or paths.RUNS / f"merge-{name}"
    log = log or run_dir / "trials.jsonl"
    out = out or paths.MODELS / name
    try:
        settings = SearchSettings(
            methods=_split(methods) or SearchSettings().methods,
            strategies=_split(strategies) or SearchSettings().strategies,
            subsets=_split(subsets) or SearchSettings().subsets,
            iterations=iterations,
            top_k=top_k,
            params=MergeParams(density=density, drop_rate=drop_rate, lam=lam, seed=seed),
            seed=seed,
            reward=reward,
            policies=_split(policy),
            max_rows=max_rows,
            max_windows=max_windows,
            max_length=max_length,
            stride=stride,
            threads=threads,
        )
        sources = resolve_sources(checkpoints)
        subset_specs = load_subsets(subsets_file)
    except (ValueError, CheckpointIndexError, SubsetFileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    run_dir.mkdir(parents=True, exist_ok=True)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def note(desc: str, done: int, total: int, info: str) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total, info="")
            bar.update(tasks[desc], completed=done, total=total, info=info)
            if not console.is_terminal and done == total:
                console.print(f"{desc}: {done}/{total} {info}")

        try:
            result, objective, _ = run_search(
                sources,
                validation,
                policies_dir,
                settings,
                log,
                subset_specs,
                base=base,
                fallback_base=paths.find_base_model(),
                progress=note,
            )
        except (ValueError, LogMismatch) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    print_summary(result)
    summary_md = markdown(result, settings.iterations)
    write_text_atomic(run_dir / "summary.md", summary_md)
    console.print(summary_md.strip().split("\n")[-1])
    if not export:
        return
    rows, policies = load_validation(validation, policies_dir, settings.policies)
    summary = export_winner(
        result,
        objective,
        params=settings.params,
        validation_rows=rows,
        policies=policies,
        run_dir=run_dir,
        out_dir=out,
        name=name,
        creation_command=command_line(),
        trial_log=log,
        started=started,
        quantize=quantize,
        options=ReleaseOptions(target, threads=threads),
    )
    write_json_atomic(run_dir / "summary.json", summary)
    console.print(
        f"[green]wrote {out} (mean validation F1 through the service, {summary['service_precision']}: "
        f"{summary['val_f1_service']:.4f}; search, torch fp32: {summary['val_f1_search']:.4f}); "
        f"trial log {log}"
    )
    if promote:
        done, why = promote_folder(out, paths.DEFAULT_MODEL_DIR)
        console.print(("[green]promoted to models/default: " if done else "[yellow]kept models/default: ") + why)
