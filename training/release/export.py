"""Export a trained checkpoint into the model folder the service loads (before release).

Export goes through optimum (fp32 ONNX); ``serving_model`` turns it into the file served as
``model.onnx`` (fused, then int8 with per-token activation scales: see
``training.release.optimize``) and is the one place to change that conversion.
Everything is written to a temporary sibling folder and renamed into place, so a crash
never leaves a half-written model. The exported folder is not released yet: thresholds,
calibration and card come from ``training.release.finalize``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from onnxruntime.transformers.optimizer import optimize_model
from optimum.exporters.onnx import main_export
from tokenizers import Tokenizer

from service.contract.policy import InputTemplate
from service.model.manifest import MANIFEST_FILE, Manifest, ModelFile, read_manifest, sha256_file
from training.io import atomic_replace_dir, temp_sibling, write_json_atomic, write_text_atomic
from training.release.optimize import (
    DEFAULT_QUANTIZATION,
    PRECISION,
    OptimizeReport,
    Quantization,
    model_dims,
    optimize_for_cpu,
)

log = logging.getLogger(__name__)

ONNX_OPSET = 18
# Files of a transformers tokenizer folder that travel with the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def export_onnx(checkpoint_dir: Path, onnx_dir: Path) -> Path:
    """fp32 ONNX export of a sequence-classification checkpoint; returns the model path."""
    main_export(
        str(checkpoint_dir), output=str(onnx_dir), task="text-classification", opset=ONNX_OPSET, do_validation=False
    )
    return Path(onnx_dir) / "model.onnx"


def serving_model(
    fp32_model: Path, out: Path, work_dir: Path, *, quantization: Quantization = DEFAULT_QUANTIZATION
) -> tuple[str, OptimizeReport]:
    """fp32 ONNX -> the file served as ``model.onnx``: fused by onnxruntime's transformer
    optimiser, then quantised (``training.release.optimize``). Returns the precision and
    what was done, both for the manifest.

    The one conversion step between export and serving: swap it here (and nowhere else) to
    serve another format. ``work_dir`` is scratch space that the caller removes.
    """
    num_heads, hidden_size = model_dims(Path(fp32_model).parent / "config.json")
    report = optimize_for_cpu(
        fp32_model,
        out,
        Path(work_dir) / "optimize",
        num_heads=num_heads,
        hidden_size=hidden_size,
        quantization=quantization,
    )
    return PRECISION[quantization], report


FP16_FILE = "model_fp16.onnx"
CUDA_PROVIDER = "CUDAExecutionProvider"


def convert_fp16(fp32_model: Path, out: Path) -> Path:
    """fp16 copy for CUDAExecutionProvider: onnxruntime's BERT optimiser (fused attention,
    skip layer norm, GELU: the GPU kernels) then its float16 converter. Inputs and outputs
    keep their types (int64 ids in, float32 logits out), so the service feeds both files
    alike. Runs on CPU without a GPU (offline python fusions only)."""
    model = optimize_model(str(fp32_model), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=True)
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(out))
    return Path(out)


def add_fp16_file(model_dir: Path, checkpoint_dir: Path) -> Manifest:
    """Add the fp16 CUDA file to an existing model folder (from the checkpoint it was exported from)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    with tempfile.TemporaryDirectory(prefix=".tmp-fp16-", dir=model_dir.parent) as tmp:
        fp16 = convert_fp16(export_onnx(checkpoint_dir, Path(tmp) / "onnx"), Path(tmp) / FP16_FILE)
        entry = ModelFile(path=FP16_FILE, sha256=sha256_file(fp16), provider=CUDA_PROVIDER, precision="fp16")
        fp16.replace(model_dir / FP16_FILE)
    manifest.files = [f for f in manifest.files if f.provider != CUDA_PROVIDER] + [entry]
    write_json_atomic(model_dir / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
    return manifest


def clean_tokenizer(path: Path) -> None:
    """Drop the fixed padding/truncation a saved tokenizer carries: windows are the encoder's job,
    and any other reader of the file would otherwise silently truncate at 128 tokens."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(path))


@dataclass(frozen=True)
class ExportSpec:
    """What the manifest of an exported folder says about the model (``export_model_folder``'s settings)."""

    name: str
    base_model: str
    max_length: int
    stride: int
    creation_command: str
    input_template: InputTemplate | None = None
    quantize: bool = True
    quantization: Quantization | None = None
    data_hashes: dict[str, str] | None = None
    training: dict[str, Any] | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def export_model_folder(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    name: str,
    base_model: str,
    max_length: int,
    stride: int,
    creation_command: str,
    policies: dict[str, dict] | None = None,
    data_hashes: dict[str, str] | None = None,
    training: dict | None = None,
    card: str | None = None,
    quantize: bool = True,
    fp16: bool = False,
    input_template: InputTemplate | None = None,
    quantization: Quantization | None = None,
) -> Manifest:
    """Build ``out_dir`` (model.onnx, tokenizer, config, manifest, card) atomically.

    ``quantize``: int8 (per-token, batch-invariant) or fused fp32; ``quantization`` names the
    scheme outright (``training.release.optimize.QUANTIZATIONS``) and wins over ``quantize``.
    ``fp16``: also write ``model_fp16.onnx`` for CUDAExecutionProvider (listed second in the
    manifest's ``files``; the CPU file stays first and names the model version)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = temp_sibling(out_dir)
    tmp_root.mkdir()
    try:
        work = tmp_root / "work"
        final = tmp_root / "final"
        final.mkdir()
        fp32 = export_onnx(checkpoint_dir, work / "onnx")
        precision, optimized = serving_model(
            fp32,
            final / "model.onnx",
            work,
            quantization=quantization or (DEFAULT_QUANTIZATION if quantize else "none"),
        )
        files = [ModelFile(path="model.onnx", sha256=sha256_file(final / "model.onnx"), precision=precision)]
        if fp16:
            convert_fp16(fp32, final / FP16_FILE)
            files.append(
                ModelFile(
                    path=FP16_FILE, sha256=sha256_file(final / FP16_FILE), provider=CUDA_PROVIDER, precision="fp16"
                )
            )
        shutil.copy2(Path(checkpoint_dir) / "config.json", final / "config.json")
        for fname in TOKENIZER_FILES:
            src = Path(checkpoint_dir) / fname
            if src.exists():
                shutil.copy2(src, final / fname)
        if not (final / "tokenizer.json").exists():
            raise FileNotFoundError(f"{checkpoint_dir} has no tokenizer.json (a fast tokenizer is required)")
        clean_tokenizer(final / "tokenizer.json")
        manifest = Manifest(
            name=name,
            base_model=base_model,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            creation_command=creation_command,
            max_length=max_length,
            stride=stride,
            files=files,
            policies=policies or {},
            data_hashes=data_hashes or {},
            training=training or {},
            input_template=input_template or InputTemplate(),
            optimization=optimized.as_dict(),
            # The service refuses a folder whose tokenizer or config was swapped or truncated.
            checksums={f: sha256_file(final / f) for f in ("tokenizer.json", "config.json") if (final / f).exists()},
        )
        write_text_atomic(final / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")
        if card is not None:
            write_text_atomic(final / "CARD.md", card)
        shutil.rmtree(work)
        atomic_replace_dir(final, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def main(argv: list[str]) -> None:
    """``python -m training.release.export add-fp16 MODEL_DIR CHECKPOINT_DIR`` (Dockerfile.gpu)."""
    if len(argv) != 3 or argv[0] != "add-fp16":
        raise SystemExit("usage: python -m training.release.export add-fp16 MODEL_DIR CHECKPOINT_DIR")
    print(add_fp16_file(Path(argv[1]), Path(argv[2])).model_dump_json(include={"files"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
