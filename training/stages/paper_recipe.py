"""The paper's ingredients from the pretrained encoder (``train uniguard --recipe paper``).

TaskGuard-FFT per policy (plain prompts) → GIP (λ1·MLM + λ2·ALICE + λ3·CE on instruction
inputs, every policy) → an FFT of the GIP checkpoint per policy. On 2 cores each trains on a
few hundred rows, too weak to add anything to the multi-policy checkpoint (a merge of them
scored 0.666 against the default's 0.794), so the recipe's default continues that checkpoint
instead (``training.stages.specialists``); this path stays for the paper's ablations and GIP's
zero-shot check across seeds (``gip_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.contract.policy import Policy
from training.data.rows import Example
from training.eval.robustness import ZERO_SHOT_HEADER, zero_rows, zero_shot_of
from training.model.head import HeadConfig
from training.model.loop import LoopConfig
from training.stages.finetune import RunContext
from training.stages.multitaskguard import gip_stage, run_mtg
from training.stages.taskguard import run_taskguard
from training.ui import print_table


def gip_zero_shot(run_dir: Path, threads: int) -> list[dict[str, Any]]:
    """The run's GIP checkpoint on the zero-shot rows, printed."""
    zero = zero_shot_of(run_dir / "mtg" / "gip", threads)
    print_table("GIP zero-shot (policies no stage trained on, threshold 0.5)", ZERO_SHOT_HEADER, zero_rows(zero))
    return zero


def paper_sources(
    ctx: RunContext,
    encoder: Path,
    train: list[Example],
    validation: list[Example],
    policies: dict[str, Policy],
    cfg: Any,
    clock: Any,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Train (or resume) TaskGuard-FFT, GIP and GIP-FFT from ``encoder``; (the run's checkpoints index, GIP zero-shot).

    ``cfg``: the recipe's ``UniGuardConfig``; ``clock``: its ``StageClock``. With ``cfg.gip_only``
    only GIP is trained and no source is returned."""
    ids = sorted(policies)
    head = HeadConfig(seed=cfg.seed, device=cfg.device, threads=cfg.threads)

    def loop(lr: float, **extra: Any) -> LoopConfig:
        return LoopConfig(epochs=cfg.epochs, batch_size=cfg.paper_batch_size, lr=lr, seed=cfg.seed,
                          device=cfg.device, threads=cfg.threads, save_every=50, **extra)  # fmt: skip

    gip_loop = loop(cfg.gip_lr, lambda_mlm=cfg.lambda_mlm, lambda_alice=cfg.lambda_alice)
    common: dict[str, Any] = {"max_length": ctx.max_length, "stride": ctx.stride, "data_hashes": ctx.data_hashes,
              "reporter": ctx.reporter, "max_validation": ctx.max_validation}  # fmt: skip
    if cfg.gip_only:
        with clock.stage("gip"):
            gip_stage(encoder, ctx, train, validation, holdout=None, max_train_per_policy=cfg.gip_rows, loop=gip_loop)
        return [], gip_zero_shot(ctx.run_dir, cfg.threads)
    with clock.stage("taskguard-fft"):
        run_taskguard(
            ctx.run_dir, encoder, policies, train, validation, policy_ids=ids, modes=["fft"],
            max_train=cfg.taskguard_rows, loop=loop(cfg.taskguard_lr), head=head, **common,
        )  # fmt: skip
    with clock.stage("gip + per-policy fft"):
        run_mtg(
            ctx.run_dir, encoder, policies, train, validation, holdout=None, policy_ids=ids, finetune_modes=["fft"],
            gip_max_train=cfg.gip_rows, ft_max_train=cfg.finetune_rows,
            gip_loop=gip_loop, ft_loop=loop(cfg.finetune_lr), head=head, **common,
        )  # fmt: skip
    return [ctx.run_dir / "checkpoints.json"], gip_zero_shot(ctx.run_dir, cfg.threads)
