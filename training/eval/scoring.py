"""The one scorer: a prompt's score is its most unsafe window, windows built by the service.

Every number the project reports goes through here: an exported folder through the
service's own loader (``service.model.onnx_model.OnnxModel``: manifest, hash, template), a
checkpoint or an in-memory model with torch, both fed by the service's ``InputEncoder``
(windows, max over windows). So a score printed by training is what a client of the
service would see. Scores are raw model probabilities: the release step fits its
calibration on them, and the service applies it afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.contract.policy import InputEncoder, InputTemplate, Policy, pad_batch
from service.model.manifest import MANIFEST_FILE
from service.model.onnx_model import OnnxModel
from training.data.rows import Example
from training.model.checkpoints import read_meta, template_of
from training.model.modeling import feeds_for, load_classifier

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Window = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # (row, input ids, attention mask, token types)
Progress = Callable[[int, int], None]


@dataclass
class Scorer:
    """Something that turns padded windows into unsafe probabilities, plus how to build them."""

    kind: str  # "onnx" or "torch"
    encoder: InputEncoder
    run: RunFn
    name: str


def model_scorer(model: Any, encoder: InputEncoder, name: str = "in-memory") -> Scorer:
    """A torch classifier in memory (validation during training, merge search), fed like the service feeds ONNX."""
    device = next(model.parameters()).device

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            feeds = {
                k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                for k, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))
            }
            return torch.softmax(model(**feeds_for(model, **feeds)).logits.float(), dim=-1)[:, 1].cpu().numpy()

    return Scorer("torch", encoder, run, name)


def torch_scorer(
    checkpoint: Path,
    *,
    template: InputTemplate | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    threads: int = 0,
    device: str = "cpu",
) -> Scorer:
    """A checkpoint folder scored with torch under the template and window of its ``uniguard.json``
    (MultiTaskGuard's defaults for a folder without one, e.g. a merged model)."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if not (checkpoint / "tokenizer.json").exists():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json (a fast tokenizer is required)")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    encoder = InputEncoder.from_file(
        checkpoint / "tokenizer.json",
        template or template_of(meta),
        max_length or int(meta.get("max_length", 128)),
        stride if stride is not None else int(meta.get("stride", 32)),
    )
    model = load_classifier(checkpoint).to(device).eval()
    return model_scorer(model, encoder, f"{meta.get('family', 'checkpoint')}:{checkpoint.name}")


def onnx_scorer(folder: Path, threads: int = 0) -> Scorer:
    """An exported model folder, loaded by the service's own loader (manifest, hash, template)."""
    model = OnnxModel.load(Path(folder), threads=threads or os.cpu_count() or 1)
    return Scorer("onnx", model.encoder, model.run, model.id)


def load_scorer(path: Path, **overrides: Any) -> Scorer:
    """ONNX when the folder has a service manifest, torch when it is a transformers checkpoint."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        return onnx_scorer(path, threads=overrides.get("threads", 0))
    if (path / "config.json").exists():
        return torch_scorer(path, **overrides)
    raise FileNotFoundError(
        f"{path} is neither an exported model folder (manifest.json) nor a checkpoint (config.json)"
    )


def encode_windows(
    encoder: InputEncoder, examples: list[Example], policies: dict[str, Policy], max_windows: int = 0
) -> list[Window]:
    """Every window of every row (the first ``max_windows`` of each when set), tagged with its row."""
    out: list[Window] = []
    for i, ex in enumerate(examples):
        enc = encoder.encode(policies[ex.policy_id], ex.text)
        windows = list(zip(enc.input_ids, enc.attention_mask, enc.token_type_ids, strict=True))
        out.extend((i, ids, m, t) for ids, m, t in (windows[:max_windows] if max_windows else windows))
    return out


def score_windows(
    run: RunFn, windows: list[Window], n_rows: int, batch_size: int = 64, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(unsafe probability, seconds) per row: max over its windows, time summed over them.

    With ``batch_size`` 1 the time is the per-request model latency; with larger batches
    windows are sorted by length (less padding) and the time is each window's share of its
    batch (throughput view).
    """
    flat = sorted(windows, key=lambda w: len(w[1])) if batch_size > 1 else list(windows)
    scores = np.zeros(n_rows, dtype=np.float64)
    latency = np.zeros(n_rows, dtype=np.float64)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        t0 = time.perf_counter()
        probs = run(
            pad_batch([c[1] for c in chunk]), pad_batch([c[2] for c in chunk]), pad_batch([c[3] for c in chunk])
        )
        per = (time.perf_counter() - t0) / len(chunk)
        for (i, *_), p in zip(chunk, probs, strict=True):
            scores[i] = max(scores[i], float(p))
            latency[i] += per
        if progress is not None:
            progress(min(s + batch_size, len(flat)), len(flat))
    return scores, latency


def score(
    scorer: Scorer,
    examples: list[Example],
    policies: dict[str, Policy],
    batch_size: int = 64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(unsafe probability, seconds) per example through ``scorer``."""
    return score_windows(
        scorer.run, encode_windows(scorer.encoder, examples, policies), len(examples), batch_size, progress
    )
