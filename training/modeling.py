"""Models of the UniGuard pipeline: classifier loading, the MLM head, freezing, checkpoints.

Every checkpoint is a plain ``save_pretrained`` folder (``model.safetensors`` +
``config.json`` + tokenizer), so the merging stage and optimum load it with
``AutoModelForSequenceClassification.from_pretrained`` and nothing of ours. What
transformers' config cannot say (family, policy, input template, window, training config,
data hashes, validation metrics) goes into ``uniguard.json`` next to it.

The base encoder (all-MiniLM-L6-v2) ships as a ``BertModel`` without its pretraining
heads, so the MLM head of guardrail-instruction pretraining is initialised fresh (BERT's
``BertOnlyMLMHead``) with its decoder tied to the word embeddings; only the small
transform and bias are new, which is why a few hundred GIP steps are enough to use it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.policy import InputTemplate

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

META_FILE = "uniguard.json"
MLM_HEAD_FILE = "mlm_head.safetensors"
LABELS = {"id2label": {0: "safe", 1: "unsafe"}, "label2id": {"safe": 0, "unsafe": 1}}
FAMILIES = ("taskguard-fft", "taskguard-cft", "mtg-gip", "mtg-cft", "mtg-fft")
# TaskGuard reads the prompt alone. An empty instruction keeps the service's InputEncoder
# (pair encoding, windows) as the one input builder: the model sees `[CLS] [SEP] prompt [SEP]`,
# and an exported TaskGuard carries this template in its manifest, so serving matches training.
TASKGUARD_TEMPLATE = InputTemplate(instruction="", query="{prompt}")
MTG_TEMPLATE = InputTemplate()


def load_classifier(path: Path, seed: int | None = None) -> "PreTrainedModel":
    """A 2-label sequence classifier from a base encoder or a checkpoint folder.

    ``seed`` seeds the fresh classifier head a base encoder gets (and whatever is initialised
    next, e.g. the MLM head): unseeded, two runs of one stage started from different heads
    and GIP's 200 CPU steps ended far apart (mean validation F1 0.42 vs 0.76).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if seed is not None:
        from training.trainer import set_seed

        set_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected from the base encoder
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2, **LABELS)
    finally:
        hf_logging.set_verbosity(verbosity)


def new_mlm_head(model: "PreTrainedModel") -> "torch.nn.Module":
    """BERT's MLM head, freshly initialised, decoder tied to the classifier's word embeddings."""
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    head = BertOnlyMLMHead(model.config)
    head.apply(model._init_weights)
    head.predictions.decoder.weight = model.get_input_embeddings().weight
    head.predictions.bias.data.zero_()
    return head


def load_mlm_head(model: "PreTrainedModel", checkpoint: Path | None) -> "torch.nn.Module":
    """The MLM head saved with a GIP checkpoint when there is one, else a fresh tied head."""
    from safetensors.torch import load_file

    head = new_mlm_head(model)
    if checkpoint is not None and (Path(checkpoint) / MLM_HEAD_FILE).exists():
        head.load_state_dict(load_file(str(Path(checkpoint) / MLM_HEAD_FILE)), strict=False)
    return head


def mlm_head_tensors(head: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """The head's own weights: the decoder weight is the word embeddings and its bias is ``predictions.bias``."""
    return {k: v.detach().contiguous() for k, v in head.state_dict().items() if not k.startswith("predictions.decoder.")}


def encoder_parameter_names(model: "PreTrainedModel") -> list[str]:
    """Embeddings and transformer layers: what CFT freezes (the pooler and classifier form the head)."""
    prefix = model.base_model_prefix
    return [n for n, _ in model.named_parameters() if n.startswith((f"{prefix}.embeddings.", f"{prefix}.encoder."))]


def freeze_encoder(model: "PreTrainedModel") -> list[str]:
    """Freeze everything but the head; returns the trainable parameter names."""
    frozen = set(encoder_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(
    model: "PreTrainedModel", tokenizer_dir: Path, out_dir: Path, meta: dict[str, Any],
    extra_tensors: dict[str, dict[str, "torch.Tensor"]] | None = None, card: str | None = None,
) -> Path:
    """Write ``out_dir`` atomically: safetensors weights, config, tokenizer, ``uniguard.json`` (and ``CARD.md``)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from training.export import atomic_replace_dir, write_json_atomic

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        for p in model.parameters():  # a CFT model must load with every weight trainable again
            p.requires_grad_(True)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        for fname, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / fname))
        meta = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta}
        write_json_atomic(tmp / META_FILE, meta)
        if card is not None:
            (tmp / "CARD.md").write_text(card, encoding="utf-8")
        atomic_replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_meta(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def is_complete(checkpoint: Path) -> bool:
    """A finished checkpoint (a stage that crashed leaves only a ``.tmp-`` sibling)."""
    checkpoint = Path(checkpoint)
    return (checkpoint / "config.json").exists() and (checkpoint / "model.safetensors").exists() and (checkpoint / META_FILE).exists()


def template_of(meta: dict[str, Any], default: InputTemplate = MTG_TEMPLATE) -> InputTemplate:
    return InputTemplate.model_validate(meta["input_template"]) if "input_template" in meta else default
