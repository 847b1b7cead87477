"""The three loss terms of guardrail-instruction pretraining (GIP), as pure functions.

``loss = λ1·MLM + λ2·ALICE + λ3·CE`` (arXiv 2504.19333, MultiTaskGuard):

- **MLM** keeps the encoder a language model of the instruction input (policy text and
  prompt), so it reads policy descriptions it was never trained on instead of memorising
  policy ids. Masking is transformers' ``DataCollatorForLanguageModeling`` (15 %, 80/10/10)
  and the loss reads only masked positions.
- **ALICE** (virtual adversarial training, label + prediction): a perturbation of the input
  embeddings inside an ε-ball, in the direction that most changes the prediction, must
  change neither the prediction (symmetric KL) nor the answer (gold-label CE). It smooths
  the decision function around training prompts, which is what keeps a small guard from
  flipping on paraphrases and typos.
- **CE** is the guard's actual task.

Kept free of training-loop state so each term is tested on its own (tests/training/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """2-class cross-entropy (unsafe = label 1), mean over the batch."""
    return F.cross_entropy(logits.float(), labels)


def make_masker(
    tokenizer: PreTrainedTokenizerBase, probability: float = 0.15, seed: int | None = None
) -> DataCollatorForLanguageModeling:
    """transformers' standard BERT masking (15 % of tokens: 80 % [MASK], 10 % random, 10 % kept)."""
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability, seed=seed)


def mask_tokens(
    masker: DataCollatorForLanguageModeling, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels): labels are the original ids at masked positions, -100 elsewhere.

    Special tokens ([CLS], [SEP], [PAD]) and padding are never masked.
    """
    special = torch.isin(input_ids, torch.tensor(masker.tokenizer.all_special_ids, dtype=input_ids.dtype)) | (
        attention_mask == 0
    )
    return masker.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)


def mlm_loss(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the MLM head at masked positions only.

    ``masked`` defaults to ``labels != -100``; when given, labels outside it are ignored
    whatever they hold. Only masked hidden states go through the vocabulary projection
    (15 % of tokens instead of all), which is most of the MLM cost on a CPU.
    """
    masked = labels.ne(-100) if masked is None else masked.bool()
    if not bool(masked.any()):
        return hidden.sum() * 0.0  # keeps the graph (and the step) valid when nothing was masked
    logits = head(hidden[masked])
    return F.cross_entropy(logits.float(), labels[masked])


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) + KL(q‖p) of two categorical predictions, mean over the batch."""
    lp, lq = F.log_softmax(logits_p.float(), dim=-1), F.log_softmax(logits_q.float(), dim=-1)
    return ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1)).mean()


def adversarial_perturbation(
    forward: Callable[[torch.Tensor], torch.Tensor],
    embeds: torch.Tensor,
    clean_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    eps: float,
    noise_std: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """δ with ‖δ_token‖₂ = ε along ∇_δ symKL(f(x+δ₀), f(x)) (one power-iteration step, as in VAT).

    δ₀ is small Gaussian noise: at δ = 0 the KL has zero gradient, one step from δ₀
    approximates its direction of steepest change. Padding positions get no perturbation.
    Returned detached: the model is trained *against* δ, not through its construction.
    """
    mask = attention_mask.unsqueeze(-1).to(embeds.dtype)
    noise = torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype, device=embeds.device) * noise_std * mask
    noise.requires_grad_(True)
    probe = symmetric_kl(forward(embeds.detach() + noise), clean_logits.detach())
    (grad,) = torch.autograd.grad(probe, noise)
    grad = grad * mask
    norm = grad.norm(dim=-1, keepdim=True)
    # Where the gradient vanished (saturated predictions) fall back to the noise direction.
    direction = torch.where(
        norm > 1e-12,
        grad / norm.clamp_min(1e-12),
        noise.detach() / noise.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12),
    )
    return (eps * direction * mask).detach()


def alice_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    embeds: torch.Tensor,
    clean_logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    eps: float,
    noise_std: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetric KL between clean and perturbed predictions, gold-label CE on the perturbed input).

    ``forward`` maps input embeddings to logits (the rest of the batch bound in). The KL is
    SMART-style: each side is pulled towards the other, detached, so the clean prediction
    is not dragged towards the adversarial one by the same gradient it is scored with.
    """
    delta = adversarial_perturbation(forward, embeds, clean_logits, attention_mask, eps, noise_std, generator)
    adv_logits = forward(embeds + delta)
    kl = 0.5 * (symmetric_kl(adv_logits, clean_logits.detach()) + symmetric_kl(clean_logits, adv_logits.detach()))
    return kl, classification_loss(adv_logits, labels)
