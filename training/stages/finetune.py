"""What every fine-tuning stage shares: one checkpoint layout, one validation routine, one skip rule.

TaskGuard-FFT/-CFT and the per-policy fine-tunes of the GIP checkpoint (mtg-fft, mtg-cft)
differ only in their starting weights and input template, so ``finetune_stage`` serves
them all, and a finished checkpoint is skipped unless its configuration changed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contract.policy import InputEncoder, InputTemplate, Policy
from service.model.manifest import sha256_file
from training.data.rows import Example
from training.data.splits import for_policy, subsample
from training.eval.metrics import metrics_by_policy
from training.eval.scoring import model_scorer, score
from training.model.batches import encode_rows
from training.model.checkpoints import is_complete, read_meta, register, save_checkpoint
from training.model.head import HeadConfig, train_head
from training.model.loop import LoopConfig, train_loop
from training.model.modeling import load_classifier
from training.stages import StageConfigMismatch
from training.ui import Reporter


def validate(
    model: Any, encoder: InputEncoder, policies: dict[str, Policy], rows: list[Example], reporter: Reporter, label: str
) -> dict[str, dict[str, Any]]:
    """Per-policy validation metrics at threshold 0.5, windows and max like the service."""
    if not rows:
        return {}
    with reporter.task(f"validate {label}") as update:
        scores, latency = score(
            model_scorer(model, encoder), rows, policies, batch_size=64, progress=lambda d, t: update(d, t, "")
        )
    return metrics_by_policy(rows, scores, latency)


RUNTIME_KEYS = ("threads", "device", "save_every")


def stage_identity(config: Any) -> Any:
    """A stage config without the settings that change speed, not results (threads, device, checkpoint cadence)."""
    if not isinstance(config, dict):
        return config
    return {
        k: (
            {kk: vv for kk, vv in v.items() if kk not in RUNTIME_KEYS}
            if isinstance(v, dict) and k in ("loop", "head")
            else v
        )
        for k, v in config.items()
    }


def stage_done(out: Path, config: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Metadata of a finished checkpoint for this config, None to (re)build; refuses silent mismatches."""
    if force and out.exists():
        shutil.rmtree(out)
    if not is_complete(out):
        return None
    meta = read_meta(out)
    if stage_identity(meta.get("config")) != stage_identity(config):
        raise StageConfigMismatch(out)
    return meta


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares: where checkpoints register, the policies, the window, the split."""

    run_dir: Path
    policies: dict[str, Policy]
    max_length: int
    stride: int
    data_hashes: dict[str, str]
    reporter: Reporter
    force: bool = False
    max_validation: int = 0  # validation rows per policy a stage scores for its record (0: all)

    def validation_rows(self, rows: list[Example], seed: int) -> list[Example]:
        """The rows a stage validates on: all, or a per-policy subsample (``make uniguard`` ranks
        its sources out of source anyway, so a stage's own figure is a record, not a decision)."""
        return subsample(rows, self.max_validation, seed) if self.max_validation else rows


def finetune_stage(
    init: Path,
    out: Path,
    ctx: RunContext,
    *,
    family: str,
    policy: str,
    mode: str,
    train_rows: list[Example],
    val_rows: list[Example],
    template: InputTemplate,
    loop: LoopConfig,
    head: HeadConfig,
    windows: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``init`` on one policy (FFT: every weight; CFT: pooler + classifier) and register it.

    ``windows``: train on every window with a clear label (as ``make model`` does), not the first only."""
    if mode not in ("fft", "cft"):
        raise ValueError(f"mode must be fft or cft, got {mode!r}")
    config = {
        "mode": mode,
        "init": str(init),
        "init_sha256": sha256_file(Path(init) / "model.safetensors")[:16],
        "max_length": ctx.max_length,
        "stride": ctx.stride,
        "train_rows": len(train_rows),
        "loop": loop.to_dict() if mode == "fft" else None,
        "head": head.to_dict() if mode == "cft" else None,
        "data": ctx.data_hashes,
        **({"windows": True} if windows else {}),  # absent when False: older checkpoints keep their identity
    }
    meta = stage_done(out, config, ctx.force)
    if meta is not None:
        ctx.reporter.print(f"[dim]skip {family} {policy}: {out} is complete")
        return meta
    if ctx.force:
        shutil.rmtree(out.with_name(f".state-{out.name}"), ignore_errors=True)
    started = time.time()
    encoder = InputEncoder.from_file(Path(init) / "tokenizer.json", template, ctx.max_length, ctx.stride)
    data = encode_rows(encoder, ctx.policies, train_rows, windows=windows, seed=loop.seed)
    model = load_classifier(init, seed=(loop if mode == "fft" else head).seed)
    with ctx.reporter.task(f"{family} {policy}") as update:
        if mode == "fft":
            log = train_loop(model, data, loop, state_dir=out.with_name(f".state-{out.name}"), progress=update)
        else:
            log = train_head(model, data, head, progress=update)
    model.to("cpu")
    val_rows = ctx.validation_rows(val_rows, (loop if mode == "fft" else head).seed)
    validation = validate(model, encoder, ctx.policies, val_rows, ctx.reporter, f"{family} {policy}")
    parent = read_meta(init).get("family")
    meta = {
        "family": family,
        "policy": policy,
        "trained_policies": [policy],
        "parent": parent or "base",
        "init": str(init),
        "input_template": template.model_dump(),
        "max_length": ctx.max_length,
        "stride": ctx.stride,
        "config": config,
        "data_hashes": ctx.data_hashes,
        "train_log": log,
        "validation": validation,
        "train_seconds": round(time.time() - started, 1),
    }
    save_checkpoint(model, Path(init), out, meta)
    shutil.rmtree(out.with_name(f".state-{out.name}"), ignore_errors=True)
    register(ctx.run_dir, out, meta)
    m = validation.get(policy, {})
    ctx.reporter.print(
        f"{family} {policy}: validation F1 {m.get('f1')} ROC-AUC {m.get('roc_auc')} "
        f"({meta['train_seconds']:.0f} s, {len(train_rows)} rows)"
    )
    return meta


def finetune_per_policy(
    init: Path,
    out_root: Path,
    ctx: RunContext,
    *,
    family: str,
    template: InputTemplate,
    train: list[Example],
    validation: list[Example],
    policy_ids: list[str],
    modes: list[str],
    max_train: int,
    loop: LoopConfig,
    head: HeadConfig,
    windows: bool = False,
) -> list[dict[str, Any]]:
    """``<family>-<mode>`` of ``init`` for every policy and mode, at ``out_root/<policy>/<mode>``."""
    metas = []
    for pid in policy_ids:
        rows = subsample(for_policy(train, pid), max_train, loop.seed)
        for mode in modes:
            metas.append(
                finetune_stage(
                    init,
                    out_root / pid / mode,
                    ctx,
                    family=f"{family}-{mode}",
                    policy=pid,
                    mode=mode,
                    train_rows=rows,
                    val_rows=for_policy(validation, pid),
                    template=template,
                    loop=loop,
                    head=head,
                    windows=windows,
                )
            )
    return metas
