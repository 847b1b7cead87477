"""TaskGuard: one binary guard per policy on plain prompts, full (FFT) or head-only (CFT) fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.contract.policy import Policy
from training.data.rows import Example
from training.model.head import HeadConfig
from training.model.loop import LoopConfig
from training.model.modeling import TASKGUARD_TEMPLATE
from training.stages.finetune import RunContext, finetune_per_policy
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
    max_validation: int = 0,
) -> list[dict[str, Any]]:
    """TaskGuard-FFT / -CFT for each policy: plain prompts (no instruction), base encoder start;
    ``max_validation``: validation rows per policy each checkpoint scores for its record (0: all)."""
    ctx = RunContext(run_dir, policies, max_length, stride, data_hashes, reporter, force, max_validation)
    return finetune_per_policy(
        base,
        run_dir / "taskguard",
        ctx,
        family="taskguard",
        template=TASKGUARD_TEMPLATE,
        train=train,
        validation=validation,
        policy_ids=policy_ids,
        modes=modes,
        max_train=max_train,
        loop=loop,
        head=head,
    )
