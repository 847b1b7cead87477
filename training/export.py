"""Export a trained checkpoint into the model folder the service loads.

Export goes through optimum (so the folder is a standard one that
``ORTModelForSequenceClassification.from_pretrained`` also loads) and onnxruntime's
dynamic int8 quantiser (the CPU serving format). Everything is written to a temporary
sibling folder and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from service.manifest import MANIFEST_FILE, Manifest, ModelFile, sha256_file

log = logging.getLogger(__name__)

ONNX_OPSET = 18
# Files of a transformers tokenizer folder that travel with the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def atomic_replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Swap a finished folder into place; the old one is removed only after the swap."""
    out_dir = Path(out_dir)
    backup = out_dir.with_name(f".old-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(backup)
    try:
        tmp_dir.rename(out_dir)
    except BaseException:
        if backup.exists():
            backup.rename(out_dir)
        raise
    if backup.exists():
        shutil.rmtree(backup)


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def export_onnx(checkpoint_dir: Path, onnx_dir: Path) -> Path:
    """fp32 ONNX export of a sequence-classification checkpoint; returns the model path."""
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint_dir), output=str(onnx_dir), task="text-classification", opset=ONNX_OPSET, do_validation=False)
    return Path(onnx_dir) / "model.onnx"


def quantize_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Dynamic int8 (weights int8, activations quantised at run time): the CPU format."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(str(onnx_dir), file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    quantizer.quantize(save_dir=str(out_dir), quantization_config=qconfig)
    return Path(out_dir) / "model_quantized.onnx"


FP16_FILE = "model_fp16.onnx"
CUDA_PROVIDER = "CUDAExecutionProvider"


def convert_fp16(fp32_model: Path, out: Path) -> Path:
    """fp16 copy for CUDAExecutionProvider: onnxruntime's BERT optimiser (fused attention,
    skip layer norm, GELU: the GPU kernels) then its float16 converter. Inputs and outputs
    keep their types (int64 ids in, float32 logits out), so the service feeds both files
    alike. Runs on CPU without a GPU (offline python fusions only)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(fp32_model), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=True)
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(out))
    return Path(out)


def add_fp16_file(model_dir: Path, checkpoint_dir: Path) -> Manifest:
    """Add the fp16 CUDA file to an existing model folder (from the checkpoint it was exported from)."""
    import tempfile

    from service.manifest import read_manifest

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
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(path))


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
) -> Manifest:
    """Build ``out_dir`` (model.onnx, tokenizer, config, manifest, card) atomically.

    ``fp16``: also write ``model_fp16.onnx`` for CUDAExecutionProvider (listed second in the
    manifest's ``files``; the CPU file stays first and names the model version)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    tmp_root.mkdir()
    try:
        work = tmp_root / "work"
        final = tmp_root / "final"
        final.mkdir()
        fp32 = export_onnx(checkpoint_dir, work / "onnx")
        if quantize:
            model_src, precision = quantize_int8(work / "onnx", work / "int8"), "int8"
        else:
            model_src, precision = fp32, "fp32"
        shutil.copy2(model_src, final / "model.onnx")
        files = [ModelFile(path="model.onnx", sha256=sha256_file(final / "model.onnx"), precision=precision)]
        if fp16:
            convert_fp16(fp32, final / FP16_FILE)
            files.append(ModelFile(path=FP16_FILE, sha256=sha256_file(final / FP16_FILE), provider=CUDA_PROVIDER, precision="fp16"))
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
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            creation_command=creation_command,
            max_length=max_length,
            stride=stride,
            files=files,
            policies=policies or {},
            data_hashes=data_hashes or {},
            training=training or {},
            # The service refuses a folder whose tokenizer or config was swapped or truncated.
            checksums={f: sha256_file(final / f) for f in ("tokenizer.json", "config.json") if (final / f).exists()},
        )
        (final / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if card is not None:
            (final / "CARD.md").write_text(card, encoding="utf-8")
        shutil.rmtree(work)
        atomic_replace_dir(final, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":  # python -m training.export add-fp16 MODEL_DIR CHECKPOINT_DIR
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "add-fp16":
        raise SystemExit("usage: python -m training.export add-fp16 MODEL_DIR CHECKPOINT_DIR")
    print(add_fp16_file(Path(sys.argv[2]), Path(sys.argv[3])).model_dump_json(include={"files"}, indent=2))
