"""A small, CPU-friendly fine-tuning loop for sequence classifiers.

Batches are grouped by length (sorted inside shuffled chunks) because most prompts are
short and padding to the longest of a random batch would double the work on 2 cores.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np


@dataclass
class TrainConfig:
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 8e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 13
    threads: int = 0  # 0: all cores


@dataclass
class Encoded:
    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]
    label: int


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk: int = 64) -> list[list[int]]:
    """Indices in batches of similar length, chunk order and batch order shuffled."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches: list[list[int]] = []
    span = batch_size * chunk
    for start in range(0, len(idx), span):
        block = sorted(idx[start : start + span], key=lambda i: lengths[i])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def collate(rows: list[Encoded], pad_id: int = 0) -> dict:
    import torch

    longest = max(len(r.input_ids) for r in rows)

    def pad(seqs: list[list[int]], value: int) -> "torch.Tensor":
        return torch.tensor([s + [value] * (longest - len(s)) for s in seqs], dtype=torch.long)

    return {
        "input_ids": pad([r.input_ids for r in rows], pad_id),
        "attention_mask": pad([r.attention_mask for r in rows], 0),
        "token_type_ids": pad([r.token_type_ids for r in rows], 0),
        "labels": torch.tensor([r.label for r in rows], dtype=torch.long),
    }


def train_classifier(model, data: list[Encoded], cfg: TrainConfig, progress=None) -> list[dict]:
    """Cross-entropy fine-tuning with AdamW and linear warm-up/decay; returns a loss log."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    set_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    rng = random.Random(cfg.seed)
    lengths = [len(r.input_ids) for r in data]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optim = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(optim, int(total_steps * cfg.warmup_ratio), total_steps)
    model.train()
    log: list[dict] = []
    step = 0
    running = None
    while step < total_steps:
        for batch_idx in length_grouped_batches(lengths, cfg.batch_size, rng):
            if step >= total_steps:
                break
            batch = collate([data[i] for i in batch_idx])
            out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            loss = float(out.loss.detach())
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if step % 20 == 0 or step == total_steps:
                log.append({"step": step, "loss": round(running, 4), "lr": sched.get_last_lr()[0]})
            if progress is not None:
                progress(step, total_steps, running)
    model.eval()
    return log


def predict_proba(model, data: list[Encoded], batch_size: int = 64) -> np.ndarray:
    """Unsafe probability per row with torch (used inside searches; serving uses ONNX)."""
    import torch

    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    out = np.zeros(len(data), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate([data[i] for i in idx])
            batch.pop("labels")
            probs = torch.softmax(model(**batch).logits.float(), dim=-1)[:, 1]
            out[idx] = probs.numpy()
    return out
