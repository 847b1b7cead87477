"""Checkpoint folders: written atomically, described by ``uniguard.json``.

What transformers' config cannot say (family, policy, input template, window, training
config, data hashes, validation metrics, the checkpoint it started from) goes into
``uniguard.json`` next to the weights; the merging stage reads it to find θ_base and the
template, the export step to build the manifest.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedModel

from service.contract.policy import InputTemplate
from training.io import atomic_replace_dir, temp_sibling, write_json_atomic, write_text_atomic
from training.model.modeling import MTG_TEMPLATE

META_FILE = "uniguard.json"
# runs/<run>/checkpoints.json lists every finished checkpoint with its family, policy and
# validation scores, so the merging stage picks its top-k from one file instead of walking folders.
INDEX_FILE = "checkpoints.json"


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer_dir: Path,
    out_dir: Path,
    meta: dict[str, Any],
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``out_dir`` atomically: safetensors weights, config, tokenizer, ``uniguard.json`` (and ``CARD.md``)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir)
    try:
        for p in model.parameters():  # a CFT model must load with every weight trainable again
            p.requires_grad_(True)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        for fname, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / fname))
        write_json_atomic(tmp / META_FILE, {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), **meta})
        if card is not None:
            write_text_atomic(tmp / "CARD.md", card)
        atomic_replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``uniguard.json``, or {} for a folder without one (a base encoder, a merge)."""
    path = Path(checkpoint) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_complete(checkpoint: Path) -> bool:
    """A finished checkpoint (a stage that crashed leaves only a ``.tmp-`` sibling)."""
    checkpoint = Path(checkpoint)
    return all((checkpoint / f).exists() for f in ("config.json", "model.safetensors", META_FILE))


def template_of(meta: dict[str, Any], default: InputTemplate = MTG_TEMPLATE) -> InputTemplate:
    """The input template a checkpoint was trained with (MultiTaskGuard's when it does not say)."""
    return InputTemplate.model_validate(meta["input_template"]) if meta.get("input_template") else default


def read_index(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / INDEX_FILE
    return json.loads(path.read_text(encoding="utf-8"))["checkpoints"] if path.exists() else []


def register(run_dir: Path, checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Add or replace a checkpoint's entry in the index (written atomically)."""
    val = meta.get("validation", {})
    own = [meta["policy"]] if meta.get("policy") else meta.get("trained_policies", [])
    f1s = [val[p]["f1"] for p in own if p in val and val[p].get("f1") is not None]
    entry = {
        "path": str(Path(checkpoint).resolve().relative_to(Path(run_dir).resolve())),
        "family": meta["family"],
        "policy": meta.get("policy"),
        "trained_policies": meta.get("trained_policies", [meta.get("policy")]),
        "parent": meta.get("parent"),
        "validation_f1": round(sum(f1s) / len(f1s), 4) if f1s else None,
        "validation_f1_by_policy": {p: m.get("f1") for p, m in val.items()},
        "validation_roc_auc_by_policy": {p: m.get("roc_auc") for p, m in val.items()},
        "threshold": 0.5,
        "input_template": meta.get("input_template"),
        "max_length": meta.get("max_length"),
    }
    entries = [e for e in read_index(run_dir) if e["path"] != entry["path"]] + [entry]
    entries.sort(key=lambda e: (e["family"], e["policy"] or ""))
    write_json_atomic(Path(run_dir) / INDEX_FILE, {"run": Path(run_dir).name, "checkpoints": entries})
    return entry
