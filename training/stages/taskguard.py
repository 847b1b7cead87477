"""TaskGuard: one binary guard per policy on plain prompts, full (FFT) or head-only (CFT) fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.policy import Policy
from training.data.rows import Example
from training.data.splits import for_policy, subsample
from training.model.head import HeadConfig
from training.model.loop import LoopConfig
from training.model.modeling import TASKGUARD_TEMPLATE
from training.stages.finetune import finetune_stage
from training.ui import Reporter


def run_taskguard(
    run_dir: Path,
    base: Path,
    policies: dict[str, Policy],
    train: list[Example],
    validation: list[Example],
    *,
    policy_ids: list[str],
    modes: list[str],
    max_train: int,
    max_length: int,
    stride: int,
    loop: LoopConfig,
    head: HeadConfig,
    data_hashes: dict[str, str],
    reporter: Reporter,
    force: bool = False,
) -> list[dict[str, Any]]:
    """TaskGuard-FFT / -CFT for each policy: plain prompts (no instruction), base encoder start."""
    metas = []
    for pid in policy_ids:
        rows = subsample(for_policy(train, pid), max_train, loop.seed)
        for mode in modes:
            metas.append(
                finetune_stage(
                    base,
                    run_dir / "taskguard" / pid / mode,
                    family=f"taskguard-{mode}",
                    policy=pid,
                    mode=mode,
                    train_rows=rows,
                    val_rows=for_policy(validation, pid),
                    policies=policies,
                    template=TASKGUARD_TEMPLATE,
                    max_length=max_length,
                    stride=stride,
                    loop=loop,
                    head=head,
                    run_dir=run_dir,
                    data_hashes=data_hashes,
                    reporter=reporter,
                    force=force,
                )
            )
    return metas
