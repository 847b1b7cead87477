"""MultiTaskGuard: guardrail-instruction pretraining (GIP) over all policies, then per-policy fine-tunes.

GIP trains one model on instruction inputs ``Instruct: <policy description> [SEP]
Query: <prompt> [SEP] <rationale>`` with ``λ1·MLM + λ2·ALICE + λ3·CE``. One policy can be
held out of it entirely (its rows and its texts lent to other policies): scoring the GIP
model on that policy's validation split, by its description alone, is the zero-shot check
of the paper's claim that GIP generalises to unseen policies.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from service.contract.policy import InputEncoder, Policy
from training.data.rows import Example
from training.data.splits import subsample, without_policy
from training.model.batches import encode_rows
from training.model.checkpoints import register, save_checkpoint
from training.model.head import HeadConfig
from training.model.loop import LoopConfig, train_loop
from training.model.losses import make_masker
from training.model.modeling import MLM_HEAD_FILE, MTG_TEMPLATE, load_classifier, load_mlm_head, mlm_head_tensors
from training.stages.finetune import RunContext, finetune_per_policy, stage_done, validate
from training.ui import Reporter


def gip_stage(
    base: Path,
    ctx: RunContext,
    train: list[Example],
    validation: list[Example],
    *,
    holdout: str | None,
    max_train_per_policy: int,
    loop: LoopConfig,
) -> dict[str, Any]:
    """Train (or resume, or skip) the GIP checkpoint at ``run_dir/mtg/gip``; validates on every policy."""
    out = ctx.run_dir / "mtg" / "gip"
    rows = without_policy(train, holdout) if holdout else list(train)
    rows = subsample(rows, max_train_per_policy, loop.seed)
    trained = sorted({ex.policy_id for ex in rows})
    config = {
        "holdout": holdout,
        "max_length": ctx.max_length,
        "stride": ctx.stride,
        "train_rows": len(rows),
        "loop": loop.to_dict(),
        "data": ctx.data_hashes,
        "init": str(base),
    }
    meta = stage_done(out, config, ctx.force)
    if meta is not None:
        ctx.reporter.print(f"[dim]skip mtg-gip: {out} is complete")
        return meta
    state_dir = ctx.run_dir / "mtg" / ".state-gip"
    if ctx.force:
        shutil.rmtree(state_dir, ignore_errors=True)
    started = time.time()
    encoder = InputEncoder.from_file(Path(base) / "tokenizer.json", MTG_TEMPLATE, ctx.max_length, ctx.stride)
    data = encode_rows(encoder, ctx.policies, rows, with_rationale=True)
    model = load_classifier(base, seed=loop.seed)
    head = load_mlm_head(model, base)
    masker = make_masker(AutoTokenizer.from_pretrained(str(base)), loop.mlm_probability, seed=loop.seed)
    with ctx.reporter.task(f"mtg-gip ({len(rows)} rows, {len(trained)} policies)") as update:
        log = train_loop(model, data, loop, head=head, masker=masker, state_dir=state_dir, progress=update)
    model.to("cpu")
    head.to("cpu")
    scores = validate(model, encoder, ctx.policies, ctx.validation_rows(validation, loop.seed), ctx.reporter, "mtg-gip")
    meta = {
        "family": "mtg-gip",
        "policy": None,
        "trained_policies": trained,
        "holdout": holdout,
        "parent": "base",
        "init": str(base),
        "input_template": MTG_TEMPLATE.model_dump(),
        "max_length": ctx.max_length,
        "stride": ctx.stride,
        "mlm_head": f"{MLM_HEAD_FILE}: BertOnlyMLMHead initialised fresh (the base ships as BertModel without "
        "pretraining heads), decoder tied to the word embeddings",
        "config": config,
        "data_hashes": ctx.data_hashes,
        "train_log": log,
        "validation": scores,
        "train_seconds": round(time.time() - started, 1),
    }
    save_checkpoint(
        model, Path(base), out, meta, extra_tensors={MLM_HEAD_FILE: mlm_head_tensors(head)}, card=gip_card(meta)
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    register(ctx.run_dir, out, meta)
    ctx.reporter.print(
        "mtg-gip validation F1: "
        + ", ".join(f"{p} {m.get('f1')}" + (" (zero-shot)" if p == holdout else "") for p, m in scores.items())
    )
    return meta


def gip_card(meta: dict[str, Any]) -> str:
    """CARD.md of the GIP checkpoint: what it is, how it was trained, what is new in it."""
    loop = meta["config"]["loop"]
    val = ", ".join(
        f"{p} {m.get('f1')}" + (" (zero-shot)" if p == meta["holdout"] else "") for p, m in meta["validation"].items()
    )
    return "\n".join(
        [
            "# MultiTaskGuard — guardrail-instruction pretraining (GIP)",
            "",
            f"- Base: {meta['init']} (all-MiniLM-L6-v2); input `Instruct: <policy description>` [SEP] "
            f"`Query: <prompt>` [SEP] `<rationale>` (rationale in training only), max {meta['max_length']} tokens.",
            f"- Loss: {loop['lambda_mlm']}·MLM + {loop['lambda_alice']}·ALICE (ε = {loop['alice_eps']}) + "
            f"{loop['lambda_cls']}·CE; {meta['config']['train_rows']} rows of {', '.join(meta['trained_policies'])}; "
            f"held out: {meta['holdout'] or 'none'}.",
            "- MLM head: the base ships as a BertModel without pretraining heads, so `mlm_head.safetensors` holds a",
            "  BertOnlyMLMHead initialised fresh for GIP, its decoder tied to the word embeddings (only its transform",
            "  and bias are stored). The classifier itself loads with AutoModelForSequenceClassification.",
            f"- Validation F1 at threshold 0.5: {val}.",
            "",
        ]
    )


def run_mtg(
    run_dir: Path,
    base: Path,
    policies: dict[str, Policy],
    train: list[Example],
    validation: list[Example],
    *,
    holdout: str | None,
    policy_ids: list[str],
    finetune_modes: list[str],
    gip_max_train: int,
    ft_max_train: int,
    max_length: int,
    stride: int,
    gip_loop: LoopConfig,
    ft_loop: LoopConfig,
    head: HeadConfig,
    data_hashes: dict[str, str],
    reporter: Reporter,
    force: bool = False,
    max_validation: int = 0,
) -> list[dict[str, Any]]:
    """GIP, then per-policy CFT / FFT of the GIP checkpoint (instruction inputs, no rationale);
    ``max_validation``: validation rows per policy each stage scores for its record (0: all)."""
    ctx = RunContext(run_dir, policies, max_length, stride, data_hashes, reporter, force, max_validation)
    gip = gip_stage(base, ctx, train, validation, holdout=holdout, max_train_per_policy=gip_max_train, loop=gip_loop)
    return [
        gip,
        *finetune_per_policy(
            run_dir / "mtg" / "gip",
            run_dir / "mtg",
            ctx,
            family="mtg",
            template=MTG_TEMPLATE,
            train=train,
            validation=validation,
            policy_ids=policy_ids,
            modes=finetune_modes,
            max_train=ft_max_train,
            loop=ft_loop,
            head=head,
        ),
    ]
