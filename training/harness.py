"""Evaluation harness: score any checkpoint or exported model on any labelled JSONL.

Both kinds go through the service's ``InputEncoder`` (windows, a prompt's score is its most
unsafe window), and an exported ONNX folder through ``service.inference.OnnxModel.load``
itself, so a number printed here is what the service would answer. A checkpoint folder
is scored with torch under the template and window stored in its ``uniguard.json`` (or
the MultiTaskGuard defaults for a folder without one, e.g. a merged model).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from service.policy import InputEncoder, InputTemplate, Policy, pad_batch
from training.data import Example
from training.metrics import binary_scores

RunFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Scorer:
    """Something that turns padded windows into unsafe probabilities, plus how to build them."""

    kind: str  # "onnx" or "torch"
    encoder: InputEncoder
    run: RunFn
    name: str


def model_scorer(model: Any, encoder: InputEncoder, name: str = "in-memory") -> Scorer:
    """A torch classifier in memory (validation during training), fed like the service feeds ONNX."""
    import torch

    device = next(model.parameters()).device

    def run(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in
                     (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))}
            return torch.softmax(model(**feeds).logits.float(), dim=-1)[:, 1].cpu().numpy()

    return Scorer("torch", encoder, run, name)


def torch_scorer(checkpoint: Path, *, template: InputTemplate | None = None, max_length: int | None = None,
                 stride: int | None = None, threads: int = 0, device: str = "cpu") -> Scorer:
    """A checkpoint folder scored with torch, inputs built by the service's InputEncoder."""
    import torch

    from training.modeling import load_classifier, read_meta, template_of

    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    if not (checkpoint / "tokenizer.json").exists():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json (a fast tokenizer is required)")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    encoder = InputEncoder.from_file(checkpoint / "tokenizer.json", template or template_of(meta),
                                     max_length or int(meta.get("max_length", 128)), stride if stride is not None else int(meta.get("stride", 32)))
    model = load_classifier(checkpoint).to(device).eval()
    return model_scorer(model, encoder, f"{meta.get('family', 'checkpoint')}:{checkpoint.name}")


def onnx_scorer(folder: Path, threads: int = 0) -> Scorer:
    """An exported model folder, loaded by the service's own loader (manifest, hash, template)."""
    from service.inference import OnnxModel

    model = OnnxModel.load(Path(folder), threads=threads or os.cpu_count() or 1)
    return Scorer("onnx", model.encoder, model.run, model.id)


def load_scorer(path: Path, **overrides: Any) -> Scorer:
    """ONNX when the folder has a service manifest, torch when it is a transformers checkpoint."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return onnx_scorer(path, threads=overrides.get("threads", 0))
    if (path / "config.json").exists():
        return torch_scorer(path, **overrides)
    raise FileNotFoundError(f"{path} is neither an exported model folder (manifest.json) nor a checkpoint (config.json)")


def score(scorer: Scorer, examples: list[Example], policies: dict[str, Policy], batch_size: int = 64,
          progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unsafe probability, seconds) per example: max over its windows, time summed over them.

    With ``batch_size`` 1 the time is the per-request model latency; with larger batches it
    is each window's share of its batch (throughput view).
    """
    flat: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for i, ex in enumerate(examples):
        enc = scorer.encoder.encode(policies[ex.policy_id], ex.text)
        flat.extend((i, ids, m, t) for ids, m, t in zip(enc.input_ids, enc.attention_mask, enc.token_type_ids))
    if batch_size > 1:
        flat.sort(key=lambda r: len(r[1]))
    scores = np.zeros(len(examples), dtype=np.float64)
    latency = np.zeros(len(examples), dtype=np.float64)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        t0 = time.perf_counter()
        probs = scorer.run(pad_batch([c[1] for c in chunk]), pad_batch([c[2] for c in chunk]), pad_batch([c[3] for c in chunk]))
        per = (time.perf_counter() - t0) / len(chunk)
        for (i, *_), p in zip(chunk, probs):
            scores[i] = max(scores[i], float(p))
            latency[i] += per
        if progress is not None:
            progress(min(s + batch_size, len(flat)), len(flat))
    return scores, latency


def metrics_by_policy(examples: list[Example], scores: np.ndarray, latency: np.ndarray, threshold: float = 0.5) -> dict[str, dict]:
    """Per policy: precision, recall, F1, FPR, ROC-AUC at ``threshold`` and p50/p95 latency (ms)."""
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    out: dict[str, dict] = {}
    for pid, idx in sorted(by_pid.items()):
        labels = np.array([examples[i].label for i in idx])
        m = binary_scores(labels, scores[idx], threshold)
        m["threshold"] = threshold
        m["latency_ms_p50"] = round(float(np.percentile(latency[idx], 50) * 1000), 3)
        m["latency_ms_p95"] = round(float(np.percentile(latency[idx], 95) * 1000), 3)
        out[pid] = m
    return out


COLUMNS = ("n", "unsafe", "precision", "recall", "f1", "fpr", "roc_auc", "latency_ms_p50", "latency_ms_p95")


def _fmt(v: object) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown_report(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table (one row per policy)."""
    lines = [f"# Evaluation of `{result['model']}`", "",
             f"- scorer: {result['kind']} ({result['scorer']}), data: `{result['data']}`, threshold {result['threshold']}, "
             f"batch size {result['batch_size']} (latency per sample{'' if result['batch_size'] == 1 else ', batch-amortised'})",
             "", "| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for pid, m in result["policies"].items():
        lines.append(f"| {pid} | " + " | ".join(_fmt(m.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def evaluate_path(model: Path, examples: list[Example], policies: dict[str, Policy], *, threshold: float = 0.5,
                  batch_size: int = 1, data_name: str = "", progress: Callable[[int, int], None] | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """Score ``examples`` with the model at ``model`` and return the full result (JSON-able)."""
    scorer = load_scorer(model, **overrides)
    scores, latency = score(scorer, examples, policies, batch_size=batch_size, progress=progress)
    return {"model": str(model), "kind": scorer.kind, "scorer": scorer.name, "data": data_name, "threshold": threshold,
            "batch_size": batch_size, "policies": metrics_by_policy(examples, scores, latency, threshold),
            "scores": [round(float(s), 6) for s in scores]}


def read_test_rows(path: Path, policies: dict[str, Policy], policy: str | None = None, limit: int | None = None) -> list[Example]:
    """Any JSONL with ``text`` and ``label`` (0 safe, 1 unsafe), mapped to a policy.

    ``policy`` overrides every row's ``policy_id`` (needed for files without one, such as the
    public files of ``../shared/data``); rows must end on a policy of ``policies``.
    """
    from training.data import DataError, read_jsonl

    out = []
    for lineno, row in enumerate(read_jsonl(Path(path)), 1):
        pid = policy or row.get("policy_id")
        if "text" not in row or row.get("label") not in (0, 1):
            raise DataError(f"{path}: row {lineno}: needs text and label 0/1")
        if pid not in policies:
            raise DataError(f"{path}: row {lineno}: policy {pid!r} unknown (pass --policy or a policies folder that has it)")
        out.append(Example(row["text"], int(row["label"]), pid, row.get("source") or Path(path).stem,
                           row.get("category"), row.get("rationale")))
        if limit and len(out) >= limit:
            break
    return out
