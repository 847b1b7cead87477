"""Models of the UniGuard pipeline: classifier loading, the MLM head, freezing, input templates.

Every checkpoint is a plain ``save_pretrained`` folder (``model.safetensors`` +
``config.json`` + tokenizer), so the merging stage and optimum load it with
``AutoModelForSequenceClassification.from_pretrained`` and nothing of ours.

The base encoder (all-MiniLM-L6-v2) ships as a ``BertModel`` without its pretraining
heads, so the MLM head of guardrail-instruction pretraining is initialised fresh (BERT's
``BertOnlyMLMHead``) with its decoder tied to the word embeddings; only the small
transform and bias are new, which is why a few hundred GIP steps are enough to use it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.utils import logging as hf_logging

from service.contract.policy import InputTemplate
from training.model.batches import set_seed

MLM_HEAD_FILE = "mlm_head.safetensors"
LABELS = {"id2label": {0: "safe", 1: "unsafe"}, "label2id": {"safe": 0, "unsafe": 1}}
FAMILIES = ("taskguard-fft", "taskguard-cft", "mtg-gip", "mtg-cft", "mtg-fft")
# TaskGuard reads the prompt alone. An empty instruction keeps the service's InputEncoder
# (pair encoding, windows) as the one input builder: the model sees `[CLS] [SEP] prompt [SEP]`,
# and an exported TaskGuard carries this template in its manifest, so serving matches training.
TASKGUARD_TEMPLATE = InputTemplate(instruction="", query="{prompt}")
MTG_TEMPLATE = InputTemplate()


def feeds_for(model: torch.nn.Module, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feeds ``model``'s forward takes: MPNet (the larger base of the capacity trial)
    has no token types, so ``token_type_ids`` is dropped for it rather than failing."""
    if "token_type_ids" in feeds and not accepts_token_types(model):
        feeds = {k: v for k, v in feeds.items() if k != "token_type_ids"}
    return feeds


def accepts_token_types(model: torch.nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


class NotABinaryClassifier(ValueError):
    """A checkpoint with another label count than the service's two (safe, unsafe)."""


def load_classifier(path: Path, seed: int | None = None) -> PreTrainedModel:
    """A 2-label sequence classifier (eval mode) from a base encoder or a checkpoint folder.

    ``seed`` seeds the fresh classifier head a base encoder gets (and whatever is initialised
    next, e.g. the MLM head): unseeded, two runs of one stage started from different heads
    and GIP's 200 CPU steps ended far apart (mean validation F1 0.42 vs 0.76). A checkpoint
    trained with another label count is refused: the service scores two.
    """
    if seed is not None:
        set_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected from the base encoder
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2, **LABELS)
    except (RuntimeError, ValueError) as exc:
        if "size mismatch" in str(exc):
            raise NotABinaryClassifier(
                f"{path}: not a 2-label classifier; the service scores 2 (safe, unsafe)"
            ) from exc
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def new_mlm_head(model: PreTrainedModel) -> torch.nn.Module:
    """BERT's MLM head, freshly initialised, decoder tied to the classifier's word embeddings."""
    head = BertOnlyMLMHead(model.config)
    head.apply(model._init_weights)
    head.predictions.decoder.weight = model.get_input_embeddings().weight
    head.predictions.bias.data.zero_()
    return head


def load_mlm_head(model: PreTrainedModel, checkpoint: Path | None) -> torch.nn.Module:
    """The MLM head saved with a GIP checkpoint when there is one, else a fresh tied head."""
    head = new_mlm_head(model)
    if checkpoint is not None and (Path(checkpoint) / MLM_HEAD_FILE).exists():
        head.load_state_dict(load_file(str(Path(checkpoint) / MLM_HEAD_FILE)), strict=False)
    return head


def mlm_head_tensors(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The head's own weights: the decoder weight is the word embeddings and its bias is ``predictions.bias``."""
    return {
        k: v.detach().contiguous() for k, v in head.state_dict().items() if not k.startswith("predictions.decoder.")
    }


def encoder_parameter_names(model: PreTrainedModel) -> list[str]:
    """Embeddings and transformer layers: what CFT freezes (the pooler and classifier form the head)."""
    prefix = model.base_model_prefix
    return [n for n, _ in model.named_parameters() if n.startswith((f"{prefix}.embeddings.", f"{prefix}.encoder."))]


def freeze_encoder(model: PreTrainedModel) -> list[str]:
    """Freeze everything but the head; returns the trainable parameter names."""
    frozen = set(encoder_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [n for n, p in model.named_parameters() if p.requires_grad]
