"""Where merge sources come from: checkpoint folders, or a checkpoints index written by training.

The training stage writes ``runs/<name>/checkpoints.json`` (``{"checkpoints": [{"path",
"family", "policy", "validation_f1", "input_template", ...}]}``, paths relative to the run
folder) and a ``uniguard.json`` next to every checkpoint (family, policy, input template,
window, ``init`` = the checkpoint it started from). Both are read leniently (a bare list of
entries, ``path``/``checkpoint``/``dir``, ``validation_f1``/``val_f1``/``f1``) so the merge
stage does not break when the training stage adds a field; what is not understood is kept in
``extra``, never guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from service.contract.policy import InputTemplate
from training.model.checkpoints import read_meta
from training.model.modeling import MTG_TEMPLATE, NotABinaryClassifier, load_classifier

PATH_KEYS = ("path", "checkpoint", "checkpoint_dir", "dir", "folder", "output_dir")
F1_KEYS = ("validation_f1", "val_f1", "f1", "best_f1")
POLICY_KEYS = ("policy", "policy_id", "policies")


class CheckpointSource(BaseModel):
    """One model that may be merged: a ``save_pretrained`` sequence-classification folder."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    name: str
    family: str | None = None
    policy: str | list[str] | None = None
    reported_f1: float | None = None
    input_template: InputTemplate | None = None
    init: Path | None = Field(None, description="The checkpoint this one was fine-tuned from (θ_base candidate).")
    max_length: int | None = None
    stride: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def template(self) -> InputTemplate:
        """The input template the source was trained with (MultiTaskGuard's when it does not say)."""
        return self.input_template or MTG_TEMPLATE

    def covers(self, policy_ids: set[str]) -> bool:
        """Whether this source was trained for (one of) these policies; multi-policy sources cover all."""
        if not policy_ids or self.policy in (None, "*", "all", "multi"):
            return True
        mine = {self.policy} if isinstance(self.policy, str) else set(self.policy)
        return bool(mine & policy_ids) or bool(mine & {"*", "all"})


class CheckpointIndexError(ValueError):
    """An index or folder that does not describe a usable checkpoint."""


def _first(entry: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if entry.get(k) is not None:
            return entry[k]
    return None


def _reported_f1(entry: dict) -> float | None:
    v = _first(entry, F1_KEYS)
    for nest in ("validation", "metrics", "val"):
        if v is None and isinstance(entry.get(nest), dict):
            v = _first(entry[nest], ("f1", "mean_f1", "val_f1"))
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def folder_meta(folder: Path) -> dict[str, Any]:
    """The training stage's ``uniguard.json`` of a checkpoint; {} when there is none or it is unreadable
    (a source is still mergeable without it, so the merge stage does not fail on it)."""
    try:
        return read_meta(folder)
    except (OSError, ValueError):
        return {}


def source_from(folder: Path, entry: dict[str, Any], name: str | None = None) -> CheckpointSource:
    """Index entry first, the folder's own ``uniguard.json`` second."""
    meta = folder_meta(folder)
    merged = {**meta, **{k: v for k, v in entry.items() if v is not None}}
    template = merged.get("input_template")
    init = merged.get("init")
    known = (
        set(PATH_KEYS)
        | set(F1_KEYS)
        | set(POLICY_KEYS)
        | {"name", "family", "input_template", "init", "max_length", "stride"}
    )
    return CheckpointSource(
        path=folder,
        name=str(name or entry.get("name") or folder.name),
        family=merged.get("family"),
        policy=_first(merged, POLICY_KEYS),
        reported_f1=_reported_f1(entry) if entry else _reported_f1(meta),
        input_template=None if template is None else InputTemplate.model_validate(template),
        init=None if not init else Path(init),
        max_length=merged.get("max_length"),
        stride=merged.get("stride"),
        extra={k: v for k, v in entry.items() if k not in known},
    )


def check_folder(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointIndexError(f"{path}: no such checkpoint folder or index file")
    if not (path / "config.json").is_file():
        raise CheckpointIndexError(f"{path}: not a checkpoint folder (no config.json)")
    if not any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    ):
        raise CheckpointIndexError(f"{path}: no weights (model.safetensors)")
    return path


def _entry_name(entry: dict[str, Any], folder: Path) -> str:
    """A readable unique-ish name: family/policy when the index gives them (folders are often just 'fft')."""
    parts = [str(p) for p in (entry.get("family"), entry.get("policy")) if p]
    return "/".join(parts) if parts else folder.name


def sources_from_index(index: Path) -> list[CheckpointSource]:
    """Sources listed by a checkpoints index JSON; relative paths are relative to the index's folder."""
    index = Path(index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointIndexError(f"{index}: cannot read checkpoints index: {exc}") from exc
    if isinstance(data, dict):
        entries = next((data[k] for k in ("checkpoints", "models", "runs", "entries") if k in data), data)
    else:
        entries = data
    if isinstance(entries, dict):  # {name: entry}
        entries = [{"name": k, **v} if isinstance(v, dict) else {"name": k, "path": v} for k, v in entries.items()]
    if not isinstance(entries, list):
        raise CheckpointIndexError(f"{index}: expected a list of checkpoint entries")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        raw_path = _first(entry, PATH_KEYS)
        if raw_path is None:
            raise CheckpointIndexError(f"{index}: entry {i} names no checkpoint folder (one of {PATH_KEYS})")
        folder = Path(raw_path)
        if not folder.is_absolute():
            folder = (index.parent / folder) if (index.parent / folder).exists() else folder.resolve()
        check_folder(folder)
        out.append(source_from(folder, entry, name=entry.get("name") or _entry_name(entry, folder)))
    return out


def resolve_sources(paths: list[Path]) -> list[CheckpointSource]:
    """Folders and index files, in order; duplicate folders are kept once and names made unique."""
    sources: list[CheckpointSource] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            sources.extend(sources_from_index(p))
        else:
            folder = check_folder(p)
            meta = folder_meta(folder)
            sources.append(source_from(folder, {}, name=_entry_name(meta, folder)))
    seen: set[Path] = set()
    unique: list[CheckpointSource] = []
    names: set[str] = set()
    for s in sources:
        key = s.path.resolve()
        if key in seen:
            continue
        seen.add(key)
        name, n = s.name, 2
        while name in names:
            name, n = f"{s.name}-{n}", n + 1
        names.add(name)
        unique.append(s.model_copy(update={"name": name}))
    if not unique:
        raise CheckpointIndexError("no checkpoints to merge")
    return unique


def load_source_model(path: Path) -> PreTrainedModel:
    """A source as a 2-label classifier in eval mode; another label count is an index error."""
    try:
        return load_classifier(path)
    except NotABinaryClassifier as exc:
        raise CheckpointIndexError(str(exc)) from exc


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of a checkpoint, detached from any module."""
    model = load_source_model(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_base_state(path: Path) -> dict[str, torch.Tensor]:
    """θ_base: the tensors of the common starting point that it really has.

    A pretrained encoder has no classification head; transformers would initialise one at
    random, and a task vector against random numbers means nothing, so missing or resized
    tensors are left out and the merger averages them instead.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=2, output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    skip = set(info.get("missing_keys", [])) | {
        k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in skip}


def lineage(source: CheckpointSource, depth: int = 10) -> list[Path]:
    """The source itself, then what it was fine-tuned from, and so on (from each ``uniguard.json``)."""
    chain = [Path(source.path).resolve()]
    init = source.init
    while init is not None and len(chain) < depth:
        init = Path(init).resolve()
        if init in chain:
            break
        chain.append(init)
        nxt = folder_meta(init).get("init")
        init = Path(nxt) if nxt else None
    return chain


def common_base(sources: list[CheckpointSource]) -> Path | None:
    """θ_base: the nearest checkpoint every source descends from (itself included).

    MultiTaskGuard fine-tunes share the GIP checkpoint; a TaskGuard and a MultiTaskGuard only
    share the pretrained encoder. None when the sources do not record where they started.
    """
    chains = [lineage(s) for s in sources]
    shared = set(chains[0]).intersection(*map(set, chains[1:]))
    for p in chains[0]:
        if p in shared and (p / "config.json").is_file():
            return p
    return None
