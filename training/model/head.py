"""CFT: train the pooler and classifier on cached [CLS] features of a frozen encoder.

Not a second fine-tuning loop: the frozen encoder (in eval mode) produces the same [CLS]
state every epoch, so it is computed once and only the head trains on it: many epochs for
the price of one forward pass, which is what makes per-policy CFT of every family cheap on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from training.model.batches import Encoded, set_seed, to_device
from training.model.loop import Progress
from training.model.losses import classification_loss
from training.model.modeling import feeds_for, freeze_encoder


@dataclass
class HeadConfig:
    """CFT on cached [CLS] features: cheap, so many epochs and a larger learning rate."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 13
    threads: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_forward(model: Any, cls_hidden: Any) -> Any:
    """Logits from [CLS] hidden states: BERT's pooler → dropout → classifier, as in its forward."""
    base = model.base_model
    if not (hasattr(base, "pooler") and base.pooler is not None and hasattr(model, "classifier")):
        raise TypeError(f"{type(model).__name__}: head-only training supports BERT-style pooler + classifier models")
    return model.classifier(model.dropout(base.pooler(cls_hidden[:, None, :])))


def cls_features(
    model: Any, data: list[Encoded], batch_size: int = 64, device: str = "cpu", progress: Progress | None = None
) -> Any:
    """[CLS] state of the last layer for every row, encoder in eval mode (what CFT trains on)."""
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    feats = torch.zeros(len(data), model.config.hidden_size)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = to_device([data[i] for i in idx], device)
            batch.pop("labels")
            feats[idx] = model.base_model(**feeds_for(model.base_model, **batch)).last_hidden_state[:, 0].float().cpu()
            if progress is not None:
                progress(min(s + batch_size, len(order)), len(order), "encode (frozen)")
    return feats


def train_head(model: Any, data: list[Encoded], cfg: HeadConfig, progress: Progress | None = None) -> list[dict]:
    """CFT: freeze embeddings + encoder, train pooler + classifier on cached [CLS] features."""
    set_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    model.to(cfg.device)
    trainable = freeze_encoder(model)
    feats = cls_features(model, data, device=cfg.device, progress=progress).to(cfg.device)
    labels = torch.tensor([r.label for r in data], dtype=torch.long, device=cfg.device)
    params = [p for n, p in model.named_parameters() if n in set(trainable)]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    log: list[dict] = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(data), generator=gen)
        total = 0.0
        for s in range(0, len(data), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size].to(cfg.device)
            loss = classification_loss(head_forward(model, feats[idx]), labels[idx])
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(idx)
        log.append({"epoch": epoch + 1, "loss": round(total / max(1, len(data)), 4)})
        if progress is not None:
            progress(epoch + 1, cfg.epochs, f"head loss {log[-1]['loss']:.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return log
