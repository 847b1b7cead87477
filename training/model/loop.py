"""The one training loop: every full fine-tune of the project (default model, TaskGuard-FFT,
GIP, MTG-FFT) runs here.

One loop keeps batching, schedule, seeding, devices and resuming identical between them, so
their differences are the losses, data and settings, not the plumbing: the loss is
``λ1·MLM + λ2·ALICE + λ3·CE``, and ``λ = (0, 0, 1)`` is plain cross-entropy fine-tuning
(the default model and every FFT are that case). CFT trains a head on cached features and
lives in ``training.model.head``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from training.model.batches import Encoded, length_grouped_batches, set_seed, to_device
from training.model.losses import alice_loss, classification_loss, mask_tokens, mlm_loss
from training.model.modeling import feeds_for

Progress = Callable[[int, int, str], None]


@dataclass
class LoopConfig:
    """Optimiser, schedule and loss weights; CPU defaults, raise epochs/rows for a GPU."""

    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 5e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 13
    threads: int = 0  # 0: all cores
    device: str = "cpu"
    lambda_mlm: float = 0.0
    lambda_alice: float = 0.0
    lambda_cls: float = 1.0
    mlm_probability: float = 0.15
    alice_eps: float = 0.05  # per-token L2 radius; MiniLM word embeddings have norm ≈ 1.07
    alice_noise: float = 1e-3
    save_every: int = 100  # steps between resumable states (0: never)
    max_steps: int = 0  # 0: derived from epochs
    # "bf16": forward and backward under CPU/GPU autocast to bfloat16 (weights and optimiser stay
    # fp32). On CPUs with AMX / AVX512-BF16 the matmuls run several times faster; "fp32" elsewhere.
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_precision(name: str, device: str = "cpu") -> str:
    """``fp32`` or ``bf16`` for ``name`` (``auto``: bf16 on a GPU or a CPU with AVX512-BF16 / AMX)."""
    name = name.strip().lower()
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ValueError(f"precision must be fp32, bf16 or auto, not {name!r}")
    if device.startswith("cuda"):
        return "bf16"
    cpu = getattr(torch, "cpu", None)
    has_bf16 = bool(cpu and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))
    return "bf16" if has_bf16 else "fp32"


def gip_step(model: Any, head: Any, batch: dict, cfg: LoopConfig, masker: Any = None) -> tuple[Any, dict[str, float]]:
    """Loss of one batch: λ1·MLM + λ2·(symKL + CE on the perturbed input) + λ3·CE. Terms with λ = 0 cost nothing."""
    ids, mask, types, labels = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["labels"]
    embeds = model.get_input_embeddings()(ids)

    def forward(e: Any) -> Any:
        return model(**feeds_for(model, inputs_embeds=e, attention_mask=mask, token_type_ids=types)).logits

    logits = forward(embeds)
    total = logits.sum() * 0.0
    parts: dict[str, float] = {}
    if cfg.lambda_cls:
        ce = classification_loss(logits, labels)
        total = total + cfg.lambda_cls * ce
        parts["ce"] = float(ce.detach())
    if cfg.lambda_alice:
        kl, adv_ce = alice_loss(forward, embeds, logits, labels, mask, cfg.alice_eps, cfg.alice_noise)
        total = total + cfg.lambda_alice * (kl + adv_ce)
        parts["kl"], parts["adv_ce"] = float(kl.detach()), float(adv_ce.detach())
    if cfg.lambda_mlm:
        masked, mlm_labels = mask_tokens(masker, ids.cpu(), mask.cpu())
        hidden = model.base_model(
            **feeds_for(model.base_model, input_ids=masked.to(ids.device), attention_mask=mask, token_type_ids=types)
        ).last_hidden_state
        mlm = mlm_loss(head, hidden, mlm_labels.to(ids.device))
        total = total + cfg.lambda_mlm * mlm
        parts["mlm"] = float(mlm.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def _schedule(lengths: list[int], cfg: LoopConfig) -> list[list[int]]:
    """Every batch of the run, fixed by the seed, so a resumed run continues the same sequence."""
    if not lengths:
        raise ValueError("no training rows")
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
    out: list[list[int]] = []
    while len(out) < total:
        out.extend(length_grouped_batches(lengths, cfg.batch_size, rng))
    return out[:total]


def train_loop(
    model: Any,
    data: list[Encoded],
    cfg: LoopConfig,
    *,
    head: Any = None,
    masker: Any = None,
    state_dir: Path | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """AdamW + linear warm-up/decay over length-grouped batches; resumes from ``state_dir/state.pt``.

    ``progress(step, total, info)`` is called after every step; the returned log has a row
    every 10 steps (running loss, learning rate, each loss term).
    """

    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {cfg.precision!r}")
    if cfg.lambda_mlm and (head is None or masker is None):
        raise ValueError("λ_mlm > 0 needs an MLM head and a masker")
    set_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    model.to(cfg.device)
    modules = [model] + ([head.to(cfg.device)] if head is not None else [])
    params, seen = [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:  # the tied decoder is the embedding matrix: once
                seen.add(id(p))
                params.append((name, p))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW(groups, lr=cfg.lr)
    batches = _schedule([len(r.input_ids) for r in data], cfg)
    sched = get_linear_schedule_with_warmup(optim, int(len(batches) * cfg.warmup_ratio), len(batches))
    step, log, running = 0, [], None
    state_path = Path(state_dir) / "state.pt" if state_dir else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["head"], strict=False)
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"].cpu())
        if masker is not None and getattr(masker, "generator", None) is not None:
            masker.generator.set_state(state["masker_rng"].cpu())
        step, log, running = int(state["step"]), list(state["log"]), state.get("running")
    for module in modules:
        module.train()
    device_type = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    for batch_idx in batches[step:]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            total, parts = gip_step(model, head, to_device([data[i] for i in batch_idx], cfg.device), cfg, masker)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        running = parts["loss"] if running is None else 0.98 * running + 0.02 * parts["loss"]
        if step % 10 == 0 or step == len(batches):
            log.append(
                {
                    "step": step,
                    "running_loss": round(running, 4),
                    "lr": sched.get_last_lr()[0],
                    **{k: round(v, 4) for k, v in parts.items()},
                }
            )
        if progress is not None:
            progress(step, len(batches), " ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        if state_path is not None and cfg.save_every and step % cfg.save_every == 0 and step < len(batches):
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_name(".state.pt.tmp")
            torch.save(
                {
                    "step": step,
                    "log": log,
                    "running": running,
                    "model": model.state_dict(),
                    "head": {k: v for k, v in head.state_dict().items() if not k.startswith("predictions.decoder.")}
                    if head is not None
                    else {},
                    "optim": optim.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "masker_rng": masker.generator.get_state()
                    if masker is not None and getattr(masker, "generator", None) is not None
                    else torch.zeros(0),
                },
                tmp,
            )
            tmp.replace(state_path)
    for module in modules:
        module.eval()
    return log
