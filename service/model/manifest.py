"""Model manifest: what a model folder contains and how the service must drive it.

The training pipeline writes it, the service trusts nothing it does not check against it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from service.contract.policy import InputTemplate
from service.model.calibration import Calibration

MANIFEST_FILE = "manifest.json"

# Operating points a model folder records per policy, most to fewest flags. Each is chosen on
# held-out rows under a cap on benign false positives (the training protocol); ``threshold``
# is the ``balanced`` one, which a folder without levels serves at every level.
Sensitivity = Literal["strict", "balanced", "permissive"]
SENSITIVITY_LEVELS: tuple[str, ...] = get_args(Sensitivity)
DEFAULT_SENSITIVITY: Sensitivity = "balanced"


class Scores(BaseModel):
    """Binary metrics with unsafe as the positive class."""

    model_config = ConfigDict(extra="allow")

    n: int = 0
    unsafe: int = 0
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    fpr: float | None = None
    accuracy: float | None = None


class PolicyEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    threshold: float = Field(ge=0.0, le=1.0)
    description_sha256: str | None = None
    validation: Scores | None = None
    validation_by_source: dict[str, Scores] = Field(default_factory=dict)
    sensitivity: dict[Sensitivity, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)

    def threshold_at(self, level: str) -> float:
        """The threshold of a sensitivity level; ``threshold`` where the folder records none."""
        return float(self.sensitivity.get(level, self.threshold))  # type: ignore[call-overload]


class ModelFile(BaseModel):
    path: str
    sha256: str
    provider: str = "CPUExecutionProvider"
    precision: str = "int8"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    base_model: str
    created_at: str
    creation_command: str
    input_template: InputTemplate = Field(default_factory=InputTemplate)
    max_length: int = Field(gt=16, le=4096)
    stride: int = Field(ge=0)
    label_names: list[str] = Field(default_factory=lambda: ["safe", "unsafe"])
    unsafe_label: int = 1
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    files: list[ModelFile]
    tokenizer_file: str = "tokenizer.json"
    policies: dict[str, PolicyEntry] = Field(default_factory=dict)
    # Fitted on validation scores; None: scores are the raw softmax probability.
    calibration: Calibration | None = None
    # How the per-policy thresholds were chosen, e.g. {"kind": "best_f1"} or {"kind": "max_fpr", "max_fpr": 0.05}.
    threshold_target: dict[str, object] | None = None
    # sha256 of the other files the model needs (tokenizer.json, config.json), checked at load.
    checksums: dict[str, str] = Field(default_factory=dict)
    data_hashes: dict[str, str] = Field(default_factory=dict)
    training: dict[str, object] = Field(default_factory=dict)
    # How the served graph was built: fused operators, quantisation scheme and scales, node
    # counts (training.release.optimize). Empty for folders exported before it existed.
    optimization: dict[str, object] = Field(default_factory=dict)

    def model_file(self, provider: str = "CPUExecutionProvider") -> ModelFile:
        for f in self.files:
            if f.provider == provider:
                return f
        raise KeyError(f"manifest lists no model file for {provider}")

    @property
    def version(self) -> str:
        """Short content hash of the CPU model file; names the answering model in every response."""
        return self.files[0].sha256[:12]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> Manifest:
    return Manifest.model_validate_json((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
