"""Checks a loaded model folder must pass before it may answer a single request.

``OnnxModel.load`` already refuses a missing folder, a bad manifest, a model file whose
sha256 differs from the manifest and an ONNX file onnxruntime cannot open. This module adds
what makes a model *silently wrong* rather than broken:

* the other files the manifest fingerprints (``checksums``: tokenizer.json, config.json)
  are the ones it was built with;
* the tokenizer matches the model: no token id the tokenizer can emit is outside the
  model's embedding table (``config.json`` ``vocab_size``, then a probe through onnxruntime
  with the tokenizer's largest id, which fails when the ONNX embedding initializer is
  smaller), and the model's position table covers ``max_length``;
* ``config.json`` labels agree with the manifest's ``label_names``;
* every served policy leaves room for a prompt in the model window (warning only: such a
  policy answers ``policy_too_long``, never a wrong verdict).

Each failure raises ``ModelLoadError`` with a message that names the file and the problem;
``/readyz`` shows it verbatim.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.policy import InstructionTooLong, Policy
from service.model.int8_weights import WeightSetting
from service.model.manifest import sha256_file
from service.model.onnx_model import ModelLoadError, OnnxModel, path_inside

log = logging.getLogger("uniguard.validation")

CONFIG_FILE = "config.json"


def check_checksums(model: OnnxModel) -> None:
    for rel, expected in model.manifest.checksums.items():
        path = path_inside(model.folder, rel)
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (fingerprinted in manifest.json checksums)")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelLoadError(
                f"{path}: sha256 {actual[:12]}… does not match manifest checksums {expected[:12]}… (file replaced or "
                "truncated)"
            )


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def tokenizer_max_id(model: OnnxModel) -> tuple[int, int]:
    """(vocabulary size, largest token id) of the tokenizer, added tokens included."""
    vocab = model.encoder.vocabulary()
    return len(vocab), max(vocab.values()) if vocab else -1


def check_config(model: OnnxModel) -> None:
    config = _read_config(model.folder)
    if config is None:
        return
    path = model.folder / CONFIG_FILE
    size, max_id = tokenizer_max_id(model)
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and max_id >= vocab_size:
        raise ModelLoadError(
            f"{model.folder}: tokenizer.json has {size} tokens (ids up to {max_id}) but {CONFIG_FILE} vocab_size is "
            f"{vocab_size}: the tokenizer belongs to another model"
        )
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions < model.manifest.max_length:
        raise ModelLoadError(
            f"{path}: max_position_embeddings {positions} is below the manifest max_length {model.manifest.max_length}"
        )
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            labels = [str(id2label[k]).lower() for k in sorted(id2label, key=int)]
        except (ValueError, KeyError):
            labels = None
        expected = [name.lower() for name in model.manifest.label_names]
        if labels is not None and len(labels) == len(expected) and labels != expected:
            raise ModelLoadError(f"{path}: id2label {labels} disagrees with the manifest label_names {expected}")


def probe_vocabulary(model: OnnxModel) -> None:
    """Run the tokenizer's largest id through onnxruntime: a smaller embedding table fails here."""
    _, max_id = tokenizer_max_id(model)
    row = [t for t in (model.encoder.token_id("[CLS]"), max_id, model.encoder.token_id("[SEP]")) if t is not None]
    ids = np.asarray([row], dtype=np.int64)
    try:
        probs = model.run(ids, np.ones_like(ids), np.zeros_like(ids))
    except Exception as exc:  # onnxruntime: "indices element out of data bounds" and the like
        raise ModelLoadError(
            f"{model.folder}: model.onnx cannot embed token id {max_id} that tokenizer.json can emit "
            f"(its vocabulary is smaller than the tokenizer's): {str(exc)[:300]}"
        ) from exc
    if not np.all(np.isfinite(probs)):
        raise ModelLoadError(f"{model.folder}: model.onnx gives non-finite scores for token id {max_id}")


def validate_model(model: OnnxModel) -> None:
    """Raise ModelLoadError unless the folder's files agree with each other."""
    check_checksums(model)
    check_config(model)
    probe_vocabulary(model)


def load_and_validate(
    folder: Path,
    threads: int,
    *,
    provider: str = "auto",
    device_id: int = 0,
    spinning: bool = True,
    int8_weights: WeightSetting = "auto",
    worker_threads: int | None = None,
) -> OnnxModel:
    """``OnnxModel.load`` (same options) plus ``validate_model``: blocking, run it in a thread."""
    model = OnnxModel.load(
        folder,
        threads,
        provider=provider,
        device_id=device_id,
        spinning=spinning,
        int8_weights=int8_weights,
        worker_threads=worker_threads,
    )
    validate_model(model)
    return model


def policy_warnings(
    model: OnnxModel, policies: Mapping[str, Policy], threshold_overrides: Mapping[str, float]
) -> list[str]:
    """Problems that do not stop serving but an operator should see after a (re)load."""
    out = []
    for policy in policies.values():
        try:
            model.encoder.check_policy(policy)
        except InstructionTooLong as exc:
            out.append(f"{exc}: requests for it answer policy_too_long")
    unknown = sorted(set(threshold_overrides) - set(policies))
    if unknown:
        out.append(f"UNIGUARD_THRESHOLDS names policies that are not served: {unknown}")
    return out
