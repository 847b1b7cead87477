"""Score calibration: turn the model's unsafe probability into a calibrated probability.

A fine-tuned classifier is usually over-confident: of the prompts it scores 0.95, far
fewer than 95 % are unsafe. Temperature scaling fixes that with one number fitted on the
validation split (``training/calibration.py``): for a 2-label softmax the unsafe
probability is ``sigmoid(z)`` with ``z = logit_unsafe - logit_safe``, and the calibrated
one is ``sigmoid(z / T)``. Since ``z = logit(p)``, the service applies it to the
probability it already has, so nothing in onnxruntime or the batcher changes.

The transform is strictly increasing: the most unsafe window stays the most unsafe, and a
threshold chosen on calibrated scores makes exactly the decisions of the corresponding
raw threshold. The manifest stores it as ``calibration: {method, temperature, ...}``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Probabilities are float32: 1.0 and 0.0 come out of softmax for |z| > ~17. Clipping keeps
# logit() finite; the calibrated score of such a prompt is then sigmoid(+-16.1 / T).
_EPS = 1e-7


def logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


class Calibration(BaseModel):
    """How raw unsafe probabilities become calibrated ones (stored in ``manifest.json``).

    Extra keys (ECE before/after, rows fitted on, when) are kept as documentation.
    """

    model_config = ConfigDict(extra="allow")

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0.01, le=100.0, description="Divides the logit; > 1 softens over-confident scores.")

    def apply(self, p: np.ndarray | float) -> np.ndarray:
        return sigmoid(logit(p) / self.temperature)

    def apply_scalar(self, p: float) -> float:
        return float(self.apply(p))


def apply_calibration(calibration: Calibration | None, p: np.ndarray | float) -> np.ndarray:
    """Calibrated probabilities, or ``p`` unchanged (as float64) when the model has none."""
    if calibration is None:
        return np.asarray(p, dtype=np.float64)
    return calibration.apply(p)
