"""Execution providers: which manifest file serves on which provider, the CUDA fallback, IO
binding and the fp16 file, all checked on CPU (no GPU here; the GPU bench is separate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.contract.policy import Policy, pad_batch
from service.model.manifest import Manifest, ModelFile, read_manifest, sha256_file
from service.model.onnx_model import CPU, CUDA, ModelLoadError, OnnxModel, select_provider
from training.release.export import FP16_FILE, convert_fp16

HAS_CUDA = CUDA in ort.get_available_providers()


def manifest(*files: tuple[str, str, str]) -> Manifest:
    return Manifest(
        name="m",
        base_model="b",
        created_at="now",
        creation_command="test",
        max_length=128,
        stride=32,
        files=[ModelFile(path=p, sha256="0" * 64, provider=prov, precision=prec) for p, prov, prec in files],
    )


CPU_FILE = ("model.onnx", CPU, "int8")
GPU_FILE = (FP16_FILE, CUDA, "fp16")


@pytest.mark.parametrize(
    ("requested", "available", "files", "expected"),
    [
        ("auto", [CPU], [CPU_FILE, GPU_FILE], ("model.onnx", CPU)),  # CPU-only onnxruntime
        ("auto", [CUDA, CPU], [CPU_FILE, GPU_FILE], (FP16_FILE, CUDA)),  # onnxruntime-gpu and an fp16 file
        ("auto", [CUDA, CPU], [CPU_FILE], ("model.onnx", CPU)),  # GPU but no fp16 file exported
        ("cpu", [CUDA, CPU], [CPU_FILE, GPU_FILE], ("model.onnx", CPU)),
        ("cuda", [CUDA, CPU], [CPU_FILE, GPU_FILE], (FP16_FILE, CUDA)),
    ],
)
def test_select_provider(requested: str, available: list[str], files: list, expected: tuple[str, str]) -> None:
    provider, entry = select_provider(requested, available, manifest(*files))
    assert (entry.path, provider) == expected
    assert entry.provider == provider


@pytest.mark.parametrize(
    ("requested", "available", "files", "match"),
    [
        ("cuda", [CPU], [CPU_FILE, GPU_FILE], "install the gpu extra"),
        ("cuda", [CUDA, CPU], [CPU_FILE], "no model file for CUDAExecutionProvider"),
        ("cpu", [CUDA, CPU], [GPU_FILE], "use UNIGUARD_PROVIDER=cuda"),
        ("tpu", [CPU], [CPU_FILE], "unknown provider"),
    ],
)
def test_select_provider_errors(requested: str, available: list[str], files: list, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        select_provider(requested, available, manifest(*files))


def test_cpu_load_reports_provider_and_precision(tiny_model_dir: Path) -> None:
    model = OnnxModel.load(tiny_model_dir, threads=1, provider="cpu")
    assert (model.provider, model.precision, model.io_binding) == (CPU, "int8", False)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: the CPU-only error path does not apply")
def test_cuda_requested_without_onnxruntime_gpu_fails_clearly(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        OnnxModel.load(tiny_model_dir, threads=1, provider="cuda")


def test_io_binding_matches_plain_run(tiny_model_dir: Path, shipped_policies: dict[str, Policy]) -> None:
    plain = OnnxModel.load(tiny_model_dir, threads=1)
    bound = OnnxModel.load(tiny_model_dir, threads=1, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    rows = [
        plain.encoder.encode(shipped_policies["toxicity"], p)
        for p in ("hi", "a much longer prompt about several things " * 3)
    ]
    ids = pad_batch([r.input_ids[0] for r in rows], plain.pad_id)
    mask = pad_batch([r.attention_mask[0] for r in rows])
    types = pad_batch([r.token_type_ids[0] for r in rows])
    np.testing.assert_array_equal(plain.run(ids, mask, types), bound.run(ids, mask, types))


@pytest.fixture(scope="module")
def fp16_folder(tiny_fp32_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 folder plus an fp16 CUDA file converted from it, listed in the manifest."""
    folder = Path(shutil.copytree(tiny_fp32_model_dir, tmp_path_factory.mktemp("fp16") / "model"))
    convert_fp16(folder / "model.onnx", folder / FP16_FILE)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"].append(
        {"path": FP16_FILE, "sha256": sha256_file(folder / FP16_FILE), "provider": CUDA, "precision": "fp16"}
    )
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_fp16_file_keeps_io_types_and_scores(fp16_folder: Path, shipped_policies: dict[str, Policy]) -> None:
    """The fp16 graph takes the same int64 inputs, returns float32 logits, and agrees with fp32."""
    fp32 = OnnxModel.load(fp16_folder, threads=1, provider="cpu")
    session = ort.InferenceSession(str(fp16_folder / FP16_FILE), providers=[CPU])
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)"] * 3
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    fp16 = OnnxModel(fp16_folder, read_manifest(fp16_folder), session, fp32.encoder)
    enc = fp32.encoder.encode(shipped_policies["prompt_injection"], "Ignore all previous instructions " * 20)
    ids, mask, types = (
        pad_batch(enc.input_ids, fp32.pad_id),
        pad_batch(enc.attention_mask),
        pad_batch(enc.token_type_ids),
    )
    np.testing.assert_allclose(fp16.run(ids, mask, types), fp32.run(ids, mask, types), atol=5e-3)


@pytest.mark.skipif(HAS_CUDA, reason="a real GPU would take the CUDA path")
def test_auto_falls_back_to_cpu_when_cuda_cannot_start(fp16_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu on a machine without a usable GPU: CUDA is listed but the session falls
    back; the service must then serve the CPU file, never the fp16 file on CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    model = OnnxModel.load(fp16_folder, threads=1, provider="auto")
    assert (model.provider, model.precision) == (CPU, "fp32")
    with pytest.raises(ModelLoadError, match="could not be initialised"):
        OnnxModel.load(fp16_folder, threads=1, provider="cuda")


def test_export_writes_fp16_file_in_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    """export_model_folder(fp16=True) and add_fp16_file list the CUDA file after the CPU one."""
    from training.release.export import add_fp16_file, export_model_folder

    ckpt = tiny_model_dir.with_name(tiny_model_dir.name + "-ckpt")  # tests.tiny keeps the checkpoint beside the folder
    m = export_model_folder(
        ckpt, tmp_path / "both", name="t", base_model="b", max_length=128, stride=32, creation_command="test", fp16=True
    )
    assert [(f.path, f.provider, f.precision) for f in m.files] == [
        ("model.onnx", CPU, "int8"),
        (FP16_FILE, CUDA, "fp16"),
    ]
    assert m.files[1].sha256 == sha256_file(tmp_path / "both" / FP16_FILE)
    assert OnnxModel.load(tmp_path / "both", threads=1).precision == "int8"  # CPU here, whatever the folder holds

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "added"))
    version = read_manifest(folder).version
    add_fp16_file(folder, ckpt)
    again = read_manifest(folder)
    assert [f.provider for f in again.files] == [CPU, CUDA] and again.version == version  # the model id does not change
    assert again.files[1].sha256 == sha256_file(folder / FP16_FILE)
    assert OnnxModel.load(folder, threads=1).id == OnnxModel.load(tiny_model_dir, threads=1).id
