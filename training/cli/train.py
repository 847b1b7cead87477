"""``python -m training train {taskguard, mtg, default}``: the training stages, one loop for all.

``taskguard`` and ``mtg`` are the paper's pipeline (under ``runs/<run>/``, splits from the
``data`` command); ``default`` builds the shipped ``models/default`` (``make model``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from service.policy import DEFAULT_POLICIES_DIR
from training import paths
from training.cli.common import RUN_HELP, THREADS_HELP, command_line, csv, record
from training.cli.data import run_splits

# Stage modules (torch, transformers) are imported inside the commands: `--help` must stay instant.

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train a stage: taskguard, mtg (MultiTaskGuard), default (the shipped model).")


@app.command()
def taskguard(
    run: str = typer.Option("issue4", help=RUN_HELP),
    policy: list[str] = typer.Option([], help="Policies to train (repeatable; default all)."),
    modes: str = typer.Option("fft,cft", help="fft (all weights) and/or cft (pooler + classifier)."),
    max_train: int = typer.Option(600, help="Training rows per policy (0: all; GPU: 0)."),
    max_length: int = typer.Option(128), stride: int = typer.Option(32),
    epochs: float = typer.Option(1.0), batch_size: int = typer.Option(16), lr: float = typer.Option(8e-5),
    head_epochs: int = typer.Option(30), head_lr: float = typer.Option(1e-3),
    threads: int = typer.Option(0, help=THREADS_HELP),
    seed: int = typer.Option(13), device: str = typer.Option("cpu"), force: bool = typer.Option(False),
) -> None:
    """TaskGuard-FFT / -CFT: one binary guard per policy on plain prompts (no instruction)."""
    from training.model.head import HeadConfig
    from training.model.loop import LoopConfig
    from training.stages.taskguard import run_taskguard
    from training.ui import Reporter

    args, started = dict(locals()), time.time()
    splits, policies, hashes = run_splits(run, show=False, any_config=True)
    run_taskguard(paths.RUNS / run, paths.base_model_path(), policies, splits.train, splits.validation,
                  policy_ids=policy or sorted(policies), modes=csv(modes), max_train=max_train, max_length=max_length,
                  stride=stride,
                  loop=LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads),
                  head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
                  data_hashes=hashes, reporter=Reporter(), force=force)
    record(paths.RUNS / run, "taskguard", args, started)


@app.command()
def mtg(
    run: str = typer.Option("issue4", help=RUN_HELP),
    holdout: str = typer.Option("tax_advice", help="Policy kept out of GIP for the zero-shot check ('' for none)."),
    policy: list[str] = typer.Option([], help="Policies to fine-tune the GIP model on (default all)."),
    finetune: str = typer.Option("cft", help="Per-policy fine-tunes of the GIP checkpoint: cft and/or fft ('' for none). "
                                             "cft by default: with fft too the stage took 33 min on 2 cores, over the "
                                             "30-min budget."),
    gip_max_train: int = typer.Option(800, help="GIP training rows per policy (0: all; GPU: 0)."),
    ft_max_train: int = typer.Option(300, help="Fine-tuning rows per policy (0: all)."),
    max_length: int = typer.Option(128), stride: int = typer.Option(32),
    gip_epochs: float = typer.Option(1.0), batch_size: int = typer.Option(16), gip_lr: float = typer.Option(
        2e-4, help="High for a short CPU run: at 8e-5 the CE of instruction inputs sat at ln 2 for the first ~80 steps."),
    lambda_mlm: float = typer.Option(0.1, help="MLM weight. 0.1 on CPU: in a short run the fresh MLM head's loss "
                                     "(~6) dominated the clipped gradient and CE did not move at 1.0; GPU runs: 1.0."),
    lambda_alice: float = typer.Option(1.0), lambda_cls: float = typer.Option(1.0),
    alice_eps: float = typer.Option(0.05, help="Per-token L2 radius of the embedding perturbation."),
    mlm_probability: float = typer.Option(0.15),
    ft_epochs: float = typer.Option(1.0), ft_lr: float = typer.Option(5e-5),
    head_epochs: int = typer.Option(30), head_lr: float = typer.Option(1e-3), save_every: int = typer.Option(50),
    threads: int = typer.Option(0, help=THREADS_HELP),
    seed: int = typer.Option(13), device: str = typer.Option("cpu"), force: bool = typer.Option(False),
) -> None:
    """MultiTaskGuard: GIP (λ1·MLM + λ2·ALICE + λ3·CE on instruction inputs), then per-policy CFT / FFT."""
    from training.model.head import HeadConfig
    from training.model.loop import LoopConfig
    from training.stages.multitaskguard import run_mtg
    from training.ui import Reporter

    args, started = dict(locals()), time.time()
    splits, policies, hashes = run_splits(run, show=False, any_config=True)
    if holdout and holdout not in policies:
        raise typer.BadParameter(f"unknown policy {holdout!r}", param_hint="--holdout")
    gip = LoopConfig(epochs=gip_epochs, batch_size=batch_size, lr=gip_lr, seed=seed, device=device, lambda_mlm=lambda_mlm,
                     lambda_alice=lambda_alice, lambda_cls=lambda_cls, alice_eps=alice_eps,
                     mlm_probability=mlm_probability, save_every=save_every, threads=threads)
    run_mtg(paths.RUNS / run, paths.base_model_path(), policies, splits.train, splits.validation,
            holdout=holdout or None, policy_ids=policy or sorted(policies), finetune_modes=csv(finetune),
            gip_max_train=gip_max_train, ft_max_train=ft_max_train, max_length=max_length, stride=stride, gip_loop=gip,
            ft_loop=LoopConfig(epochs=ft_epochs, batch_size=batch_size, lr=ft_lr, seed=seed, device=device,
                               threads=threads),
            head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
            data_hashes=hashes, reporter=Reporter(), force=force)
    record(paths.RUNS / run, "mtg", args, started)


@app.command()
def default(
    data_dir: Path = typer.Option(paths.DEFAULT_DATA, help="Folder of the public JSONL files (../shared/data)."),
    examples_dir: Path = typer.Option(paths.EXAMPLES, help="Folder of hand-written example JSONL files."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR, help="Folder of policy YAML files."),
    out: Path = typer.Option(paths.DEFAULT_MODEL_DIR, help="Model folder to write."),
    run_dir: Path = typer.Option(paths.DEFAULT_RUN_DIR, help="Work folder; a rerun resumes from it."),
    max_length: int = typer.Option(128, help="Tokens per window (instruction + prompt)."),
    stride: int = typer.Option(32, help="Tokens shared by consecutive windows of a long prompt."),
    epochs: float = typer.Option(1.0, help="Passes over the training split (1 takes ~20 min on 2 cores)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(8e-5),
    seed: int = typer.Option(13),
    threads: int = typer.Option(0, help=THREADS_HELP),
    force: bool = typer.Option(False, help="Replace the output even if its validation F1 is higher."),
    threshold_target: str = typer.Option("best-f1", help="Per-policy threshold target: best-f1, or max-fpr:<rate>."),
) -> None:
    """Train, calibrate and release the shipped multi-policy model (CPU, ~25 min on 2 cores; `make model`)."""
    from training.data.rows import DataError
    from training.eval.thresholds import ThresholdTarget
    from training.stages.default import DEFAULT_LOOP, build_default

    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder of JSONL files", param_hint="--data-dir")
    try:
        target = ThresholdTarget.parse(threshold_target)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold-target") from exc
    loop = replace(DEFAULT_LOOP, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threads=threads)
    try:
        build_default(data_dir, examples_dir, policies_dir, out, run_dir, max_length=max_length, stride=stride,
                      loop=loop, force=force, target=target, creation_command=f"make model  # {command_line()}")
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
