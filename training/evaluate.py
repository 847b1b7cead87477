"""Score examples with an exported model exactly as the service does, and report.

Scores of an ONNX model come from the service's own loader and input builder (windows,
max over windows), so a number printed here is what a client of the service would see.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from service.policy import Policy
from training.data import Example
from training.metrics import best_f1_threshold, binary_scores, source_weights


def score_examples(model_dir: Path, examples: list[Example], policies: dict[str, Policy], threads: int = 0, batch_size: int = 64, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Unsafe probability per example and per-example latency (seconds, batch-amortised)."""
    from service.inference import OnnxModel

    model = OnnxModel.load(Path(model_dir), threads=threads or os.cpu_count() or 1)
    encoded = [model.encoder.encode(policies[ex.policy_id], ex.text) for ex in examples]
    # Flatten windows, batch by length, then take the max window per example.
    flat: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for i, enc in enumerate(encoded):
        for ids, mask, types in zip(enc.input_ids, enc.attention_mask, enc.token_type_ids):
            flat.append((i, ids, mask, types))
    flat.sort(key=lambda r: len(r[1]))
    scores = np.zeros(len(examples), dtype=np.float64)
    latency = np.zeros(len(examples), dtype=np.float64)
    from service.policy import pad_batch

    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        t0 = time.perf_counter()
        probs = model.run(pad_batch([c[1] for c in chunk]), pad_batch([c[2] for c in chunk]), pad_batch([c[3] for c in chunk]))
        per = (time.perf_counter() - t0) / len(chunk)
        for (i, *_), p in zip(chunk, probs):
            scores[i] = max(scores[i], float(p))
            latency[i] += per
        if progress is not None:
            progress(min(s + batch_size, len(flat)), len(flat))
    return scores, latency


def choose_thresholds(examples: list[Example], scores: np.ndarray, default: float = 0.5) -> dict[str, float]:
    """Per policy, the F1-best threshold with every source (benign and cross groups pooled) weighted equally."""
    out = {}
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    for pid, idx in by_pid.items():
        labels = np.array([examples[i].label for i in idx])
        # Group lent rows (benign:*, cross:*) so a 5-row group cannot swing the threshold.
        weights = source_weights([examples[i].source.split(":")[0] for i in idx])
        out[pid] = best_f1_threshold(labels, scores[idx], weights, default=default)
    return out


def report(examples: list[Example], scores: np.ndarray, thresholds: dict[str, float], default: float = 0.5) -> dict[str, dict]:
    """{policy: {"overall": scores, "by_source": {source: scores}}} at each policy's threshold."""
    out: dict[str, dict] = {}
    by_pid: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_pid[ex.policy_id].append(i)
    for pid, idx in sorted(by_pid.items()):
        t = thresholds.get(pid, default)
        labels = np.array([examples[i].label for i in idx])
        entry = {"threshold": round(t, 4), "overall": binary_scores(labels, scores[idx], t), "by_source": {}}
        by_src: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            by_src[examples[i].source].append(i)
        for src, sidx in sorted(by_src.items()):
            entry["by_source"][src] = binary_scores(np.array([examples[i].label for i in sidx]), scores[sidx], t)
        out[pid] = entry
    return out
