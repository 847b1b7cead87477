"""Specialists: the multi-policy checkpoint continued on one policy each (TaskGuards initialised from it).

Every specialist starts from the same weights (the base ``make model`` trains: one instruction
model for every policy), reads the base's own input template and window, and trains on every
training row of its policy (the rows lent to it included) for a fixed number of steps, with
the one training loop (cross-entropy, every window with a clear label, as the base was
trained). Their task vectors (specialist − base) are what the merge search combines, with
the base as θ_base: merging helps when every ingredient is strong where the others are not
and all share one starting point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data.rows import Example
from training.model.checkpoints import is_complete, read_meta, template_of
from training.model.head import HeadConfig
from training.model.loop import LoopConfig
from training.stages.finetune import RunContext, finetune_per_policy

FAMILY = "specialist"


def check_base(base: Path) -> dict[str, Any]:
    """The base checkpoint's ``uniguard.json``; a plain error when the folder is not a finished checkpoint."""
    base = Path(base)
    if not is_complete(base):
        raise ValueError(
            f"{base} is not a finished checkpoint (config.json, model.safetensors, uniguard.json): "
            "train it first (make model) or pass another --base"
        )
    return read_meta(base)


def specialists_dir(run_dir: Path, steps: int) -> Path:
    """Where one budget's specialists live: ``run_dir/specialists-<steps>/<policy>/fft``."""
    return Path(run_dir) / f"specialists-{steps}"


def train_specialists(
    base: Path,
    ctx: RunContext,
    train: list[Example],
    validation: list[Example],
    *,
    policy_ids: list[str],
    loop: LoopConfig,
) -> list[Path]:
    """Train (or resume, or skip) one specialist per policy from ``base``; ``loop.max_steps`` is the budget."""
    if loop.max_steps < 1:
        raise ValueError("a specialist budget is a number of steps (max_steps >= 1)")
    meta = check_base(base)
    if (meta.get("max_length"), meta.get("stride")) not in ((None, None), (ctx.max_length, ctx.stride)):
        raise ValueError(
            f"{base} was trained with window {meta.get('max_length')} / stride {meta.get('stride')}, "
            f"not {ctx.max_length} / {ctx.stride}: specialists must read what the base reads"
        )
    out_root = specialists_dir(ctx.run_dir, loop.max_steps)
    finetune_per_policy(
        Path(base),
        out_root,
        ctx,
        family=FAMILY,
        template=template_of(meta),
        train=train,
        validation=validation,
        policy_ids=policy_ids,
        modes=["fft"],
        max_train=0,  # every row of the policy: the budget is the step count
        loop=loop,
        head=HeadConfig(seed=loop.seed, device=loop.device, threads=loop.threads),  # unused by fft
        windows=True,
    )
    return [out_root / pid / "fft" for pid in policy_ids]
