"""``python -m training train {taskguard, mtg, default, uniguard}``: the training stages, one loop for all.

``taskguard`` and ``mtg`` are the paper's pipeline (under ``runs/<run>/``, splits from the
``data`` command); ``default`` builds the shipped ``models/default`` (``make model``);
``uniguard`` continues that model per policy into specialists and merges them back through a
search rewarded out of source, and may replace ``models/default`` (``make uniguard``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR
from training import paths
from training.cli.common import (
    QUANTIZATION_HELP,
    RUN_HELP,
    THREADS_HELP,
    DataDirOption,
    ExamplesDirOption,
    PoliciesDirOption,
    clean_exit,
    command_line,
    csv,
    parse_quantization,
    record,
)
from training.cli.data import run_splits
from training.data.rows import DataError
from training.stages import StageConfigMismatch
from training.ui import Reporter

# Stage modules (torch, transformers) are imported inside the commands: `--help` must stay instant.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train a stage: taskguard, mtg (MultiTaskGuard), default (the shipped model), uniguard (the merged recipe).",
)


@app.command()
def taskguard(
    run: Annotated[str, typer.Option(help=RUN_HELP)] = "paper",
    policy: Annotated[list[str] | None, typer.Option(help="Policies to train (repeatable; default all).")] = None,
    modes: Annotated[str, typer.Option(help="fft (all weights) and/or cft (pooler + classifier).")] = "fft,cft",
    max_train: Annotated[int, typer.Option(help="Training rows per policy (0: all; GPU: 0).")] = 600,
    max_length: Annotated[int, typer.Option()] = 128,
    stride: Annotated[int, typer.Option()] = 32,
    epochs: Annotated[float, typer.Option()] = 1.0,
    batch_size: Annotated[int, typer.Option()] = 16,
    lr: Annotated[float, typer.Option()] = 8e-5,
    head_epochs: Annotated[int, typer.Option()] = 30,
    head_lr: Annotated[float, typer.Option()] = 1e-3,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    seed: Annotated[int, typer.Option()] = 13,
    device: Annotated[str, typer.Option()] = "cpu",
    force: Annotated[bool, typer.Option()] = False,
) -> None:
    """TaskGuard-FFT / -CFT: one binary guard per policy on plain prompts (no instruction)."""
    from training.model.head import HeadConfig
    from training.model.loop import LoopConfig
    from training.stages.taskguard import run_taskguard

    args, started = dict(locals()), time.time()
    splits, policies, hashes = run_splits(run, show=False, any_config=True)
    with clean_exit(StageConfigMismatch):
        run_taskguard(
            paths.RUNS / run,
            paths.base_model_path(),
            policies,
            splits.train,
            splits.validation,
            policy_ids=policy or sorted(policies),
            modes=csv(modes),
            max_train=max_train,
            max_length=max_length,
            stride=stride,
            loop=LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads),
            head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
            data_hashes=hashes,
            reporter=Reporter(),
            force=force,
        )
    record(paths.RUNS / run, "taskguard", args, started)


@app.command()
def mtg(
    run: Annotated[str, typer.Option(help=RUN_HELP)] = "paper",
    holdout: Annotated[
        str, typer.Option(help="Policy kept out of GIP for the zero-shot check ('' for none).")
    ] = "tax_advice",
    policy: Annotated[
        list[str] | None, typer.Option(help="Policies to fine-tune the GIP model on (default all).")
    ] = None,
    finetune: Annotated[
        str,
        typer.Option(
            help="Per-policy fine-tunes of the GIP checkpoint: cft and/or fft ('' for none). "
            "cft by default: with fft too the stage took 33 min on 2 cores, over the "
            "30-min budget."
        ),
    ] = "cft",
    gip_max_train: Annotated[int, typer.Option(help="GIP training rows per policy (0: all; GPU: 0).")] = 800,
    ft_max_train: Annotated[int, typer.Option(help="Fine-tuning rows per policy (0: all).")] = 300,
    max_length: Annotated[int, typer.Option()] = 128,
    stride: Annotated[int, typer.Option()] = 32,
    gip_epochs: Annotated[float, typer.Option()] = 1.0,
    batch_size: Annotated[int, typer.Option()] = 16,
    gip_lr: Annotated[
        float,
        typer.Option(
            help="High for a short CPU run: at 8e-5 the CE of instruction inputs sat at ln 2 for the first ~80 steps."
        ),
    ] = 2e-4,
    lambda_mlm: Annotated[
        float,
        typer.Option(
            help="MLM weight. 0.1 on CPU: in a short run the fresh MLM head's loss "
            "(~6) dominated the clipped gradient and CE did not move at 1.0; GPU runs: 1.0."
        ),
    ] = 0.1,
    lambda_alice: Annotated[float, typer.Option()] = 1.0,
    lambda_cls: Annotated[float, typer.Option()] = 1.0,
    alice_eps: Annotated[float, typer.Option(help="Per-token L2 radius of the embedding perturbation.")] = 0.05,
    mlm_probability: Annotated[float, typer.Option()] = 0.15,
    ft_epochs: Annotated[float, typer.Option()] = 1.0,
    ft_lr: Annotated[float, typer.Option()] = 5e-5,
    head_epochs: Annotated[int, typer.Option()] = 30,
    head_lr: Annotated[float, typer.Option()] = 1e-3,
    save_every: Annotated[int, typer.Option()] = 50,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    seed: Annotated[int, typer.Option()] = 13,
    device: Annotated[str, typer.Option()] = "cpu",
    force: Annotated[bool, typer.Option()] = False,
) -> None:
    """MultiTaskGuard: GIP (λ1·MLM + λ2·ALICE + λ3·CE on instruction inputs), then per-policy CFT / FFT."""
    from training.model.head import HeadConfig
    from training.model.loop import LoopConfig
    from training.stages.multitaskguard import run_mtg

    args, started = dict(locals()), time.time()
    splits, policies, hashes = run_splits(run, show=False, any_config=True)
    if holdout and holdout not in policies:
        raise typer.BadParameter(f"unknown policy {holdout!r}", param_hint="--holdout")
    gip = LoopConfig(
        epochs=gip_epochs,
        batch_size=batch_size,
        lr=gip_lr,
        seed=seed,
        device=device,
        lambda_mlm=lambda_mlm,
        lambda_alice=lambda_alice,
        lambda_cls=lambda_cls,
        alice_eps=alice_eps,
        mlm_probability=mlm_probability,
        save_every=save_every,
        threads=threads,
    )
    with clean_exit(StageConfigMismatch):
        run_mtg(
            paths.RUNS / run,
            paths.base_model_path(),
            policies,
            splits.train,
            splits.validation,
            holdout=holdout or None,
            policy_ids=policy or sorted(policies),
            finetune_modes=csv(finetune),
            gip_max_train=gip_max_train,
            ft_max_train=ft_max_train,
            max_length=max_length,
            stride=stride,
            gip_loop=gip,
            ft_loop=LoopConfig(
                epochs=ft_epochs, batch_size=batch_size, lr=ft_lr, seed=seed, device=device, threads=threads
            ),
            head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
            data_hashes=hashes,
            reporter=Reporter(),
            force=force,
        )
    record(paths.RUNS / run, "mtg", args, started)


@app.command()
def default(
    data_dir: DataDirOption = paths.DEFAULT_DATA,
    examples_dir: ExamplesDirOption = paths.EXAMPLES,
    policies_dir: PoliciesDirOption = DEFAULT_POLICIES_DIR,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = paths.DEFAULT_MODEL_DIR,
    run_dir: Annotated[Path, typer.Option(help="Work folder; a rerun resumes from it.")] = paths.DEFAULT_RUN_DIR,
    max_length: Annotated[int, typer.Option(help="Tokens per window (instruction + prompt).")] = 128,
    stride: Annotated[int, typer.Option(help="Tokens shared by consecutive windows of a long prompt.")] = 32,
    epochs: Annotated[float, typer.Option(help="Passes over the training split (1 takes ~20 min on 2 cores).")] = 1.0,
    batch_size: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option()] = 8e-5,
    seed: Annotated[int, typer.Option()] = 13,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    force: Annotated[bool, typer.Option(help="Replace the output even if its validation F1 is higher.")] = False,
    threshold_target: Annotated[
        str,
        typer.Option(
            help="Per-policy thresholds: levels (strict / balanced / permissive, each the best held-out balanced "
            "score under its benign FPR caps), max-fpr:<rate> (one level at that pooled held-out FPR), or best-f1."
        ),
    ] = "levels",
    min_parity: Annotated[
        float,
        typer.Option(
            help="Fail the release if the served int8 file's verdicts agree with the fp32 checkpoint's on fewer "
            "validation rows than this (0: measure and record only)."
        ),
    ] = 0.995,
    quantization: Annotated[str, typer.Option(help=QUANTIZATION_HELP)] = "",
    precision: Annotated[
        str,
        typer.Option(
            help="Training arithmetic: fp32, bf16 (autocast; weights stay fp32), or auto (bf16 where the CPU has "
            "AVX512-BF16 or AMX, fp32 elsewhere)."
        ),
    ] = "auto",
) -> None:
    """Train, calibrate and release the shipped multi-policy model (CPU, ~25 min on 2 cores; `make model`)."""
    from training.eval.thresholds import ThresholdTarget
    from training.release.finalize import ParityError
    from training.stages.default import DEFAULT_LOOP, build_default

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder of JSONL files", param_hint="--data-dir")
    try:
        target = ThresholdTarget.parse(threshold_target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold-target") from exc
    from training.model.loop import resolve_precision

    try:
        resolved = resolve_precision(precision)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--precision") from exc
    loop = replace(
        DEFAULT_LOOP, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threads=threads, precision=resolved
    )
    try:
        build_default(
            data_dir,
            examples_dir,
            policies_dir,
            out,
            run_dir,
            max_length=max_length,
            stride=stride,
            loop=loop,
            force=force,
            target=target,
            creation_command=f"make model  # {command_line()}",
            min_parity=min_parity if min_parity > 0 else None,
            quantization=parse_quantization(quantization),
        )
    except (DataError, ParityError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def uniguard(
    data_dir: DataDirOption = paths.DEFAULT_DATA,
    examples_dir: ExamplesDirOption = paths.EXAMPLES,
    policies_dir: PoliciesDirOption = DEFAULT_POLICIES_DIR,
    out: Annotated[Path, typer.Option(help="Served folder the merge may replace.")] = paths.DEFAULT_MODEL_DIR,
    run_dir: Annotated[Path, typer.Option(help="Work folder; a rerun resumes from it.")] = paths.RUNS / "uniguard",
    recipe: Annotated[
        str,
        typer.Option(
            help="specialists: the base continued per policy, merged back; paper: TaskGuard / GIP / GIP-FFT "
            "from the pretrained encoder."
        ),
    ] = "specialists",
    base: Annotated[
        Path | None,
        typer.Option(
            help="The multi-policy checkpoint the specialists continue, its split beside it (default: "
            "runs/default/checkpoint, make model's fine-tune, trained first when missing)."
        ),
    ] = None,
    steps: Annotated[
        str,
        typer.Option(
            help="Specialist budgets: training steps of each specialist (its policy's rows, cycled), comma-separated; "
            "one specialist per policy and budget, all searched together."
        ),
    ] = "75,150",
    batch_size: Annotated[int, typer.Option(help="Specialists' batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Specialists' peak learning rate (linear warm-up and decay).")] = 5e-5,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (autocast) or auto (bf16 where the CPU has it).")] = "auto",
    methods: Annotated[str, typer.Option(help="Merge methods searched (comma-separated).")] = "ties,dare_ties,soup",
    strategies: Annotated[str, typer.Option(help="Bandit strategies (random, egreedy, ucb, thompson).")] = "ucb",
    subsets: Annotated[str, typer.Option(help="Parameter subsets searched (comma-separated).")] = "all,no_head",
    iterations: Annotated[int, typer.Option(help="Merge trials per method x strategy (GPU: 50).")] = 6,
    top_k: Annotated[int, typer.Option(help="Sources merged (the best by the out-of-source reward).")] = 6,
    search_rows: Annotated[int, typer.Option(help="Validation rows the search scores (0: all).")] = 400,
    search_windows: Annotated[int, typer.Option(help="Windows per row the search scores (0: all).")] = 2,
    heldout_per_cell: Annotated[
        int, typer.Option(help="Held-out tune rows per policy x source x class the search scores (>= 10).")
    ] = 20,
    compare_per_cell: Annotated[
        int, typer.Option(help="Held-out rows per cell and half of the per-policy test-half comparison.")
    ] = 60,
    taskguard_rows: Annotated[int, typer.Option(help="paper: TaskGuard-FFT rows per policy (0: all).")] = 150,
    gip_rows: Annotated[int, typer.Option(help="paper: GIP rows per policy (0: all).")] = 400,
    finetune_rows: Annotated[int, typer.Option(help="paper: per-policy FFT rows of the GIP model (0: all).")] = 150,
    epochs: Annotated[float, typer.Option(help="paper: epochs of every training stage (GPU: 2).")] = 1.0,
    lambda_mlm: Annotated[float, typer.Option(help="paper: GIP's MLM weight (CPU 0.1; GPU 1.0).")] = 0.1,
    lambda_alice: Annotated[float, typer.Option(help="paper: GIP's ALICE weight.")] = 1.0,
    threads: Annotated[int, typer.Option(help=THREADS_HELP)] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda (training stages).")] = "cpu",
    seed: Annotated[int, typer.Option()] = 13,
    force: Annotated[bool, typer.Option(help="Promote the merge even if it does not win.")] = False,
    extra_source: Annotated[
        list[Path] | None,
        typer.Option(help="A checkpoint folder trained on the same split, searched with the recipe's (repeatable)."),
    ] = None,
    gip_only: Annotated[
        bool,
        typer.Option(
            help="paper: train GIP and score its zero-shot rows only: the zero-shot check across seeds "
            "(--seed N --run-dir runs/uniguard-sN)."
        ),
    ] = False,
) -> None:
    """The served model as a UniGuard merge: specialists continued from the multi-policy checkpoint, one
    merge search rewarded out of source, release, promotion over models/default only if it wins."""
    from training.release.finalize import ParityError
    from training.stages.uniguard import UniGuardConfig, build_uniguard

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder of JSONL files", param_hint="--data-dir")
    try:
        budgets = tuple(sorted({int(x) for x in csv(steps)}))
    except ValueError:
        budgets = ()
    if not budgets or min(budgets) < 1:
        raise typer.BadParameter(f"{steps!r}: budgets are step counts >= 1, e.g. 75,150", param_hint="--steps")
    cfg = UniGuardConfig(
        recipe=recipe,
        base=str(base) if base else "",
        specialist_steps=budgets,
        batch_size=batch_size,
        lr=lr,
        precision=precision,
        methods=tuple(csv(methods)),
        strategies=tuple(csv(strategies)),
        subsets=tuple(csv(subsets)),
        iterations=iterations,
        top_k=top_k,
        search_rows=search_rows,
        search_windows=search_windows,
        heldout_per_cell=heldout_per_cell,
        compare_per_cell=compare_per_cell,
        taskguard_rows=taskguard_rows,
        gip_rows=gip_rows,
        finetune_rows=finetune_rows,
        epochs=epochs,
        lambda_mlm=lambda_mlm,
        lambda_alice=lambda_alice,
        threads=threads,
        device=device,
        seed=seed,
        gip_only=gip_only,
        extra_sources=tuple(str(p) for p in extra_source or ()),
    )
    try:
        build_uniguard(
            data_dir,
            examples_dir,
            policies_dir,
            out,
            run_dir,
            cfg,
            force=force,
            creation_command=f"make uniguard  # {command_line()}",
        )
    except (DataError, ParityError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except StageConfigMismatch as exc:  # the recipe's --force promotes; it never retrains
        typer.echo(
            f"error: {exc.path} was trained with other settings or in another run folder; "
            "the recipe resumes only its own run: use a new --run-dir",
            err=True,
        )
        raise typer.Exit(2) from exc
