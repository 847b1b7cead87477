"""A model folder that is missing, truncated or mismatched never answers a request.

Each broken folder is served by the real service (all servers start in parallel): the
process stays up, /readyz stays 503 with a message naming the file and the problem, and
/v1/classify answers 503 not_ready instead of a wrong verdict. The checks themselves are
also exercised in-process (``service.model.folder_checks``) where a server adds nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from service.contract.policy import Policy
from service.model.folder_checks import load_and_validate, policy_warnings
from service.model.manifest import sha256_file
from service.model.onnx_model import ModelLoadError, OnnxModel
from tests.harness.live_server import Server, assert_error
from tests.service.sidecar import servers


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(folder: Path, name: str) -> None:
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


def truncated_model(folder: Path) -> None:
    truncate(folder, "model.onnx")


def truncated_model_rehashed(folder: Path) -> None:
    """Truncated, and someone 'fixed' the manifest hash: onnxruntime must refuse it."""
    truncate(folder, "model.onnx")
    files = json.loads((folder / "manifest.json").read_text())["files"]
    files[0]["sha256"] = sha256_file(folder / "model.onnx")
    _edit_manifest(folder, files=files)


def not_onnx(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"this is not an ONNX graph")
    files = json.loads((folder / "manifest.json").read_text())["files"]
    files[0]["sha256"] = sha256_file(folder / "model.onnx")
    _edit_manifest(folder, files=files)


def truncated_tokenizer(folder: Path) -> None:
    truncate(folder, "tokenizer.json")


def swapped_tokenizer(folder: Path) -> None:
    """A tokenizer that loads and has the same vocabulary but no longer lowercases: every
    capitalised word would map to [UNK] or other pieces. Only the manifest fingerprint sees it."""
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False
    (folder / "tokenizer.json").write_text(json.dumps(data))


def bigger_tokenizer(folder: Path, *, keep_config: bool = True) -> None:
    """The tokenizer of another model: 100 more tokens than the model's embedding table."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"extratoken{i}" for i in range(100)])
    tok.save(str(folder / "tokenizer.json"))
    _edit_manifest(folder, checksums={})  # a careless copy that even re-fingerprinted nothing
    if not keep_config:
        (folder / "config.json").unlink()


def bigger_tokenizer_no_config(folder: Path) -> None:
    bigger_tokenizer(folder, keep_config=False)


def invalid_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"name": "half a manifest"')


# name -> (how to break the folder, words the readiness message must contain)
BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "no_manifest": (no_manifest, ("manifest.json is missing",)),
    "truncated_model": (truncated_model, ("model.onnx", "sha256", "does not match manifest")),
    "truncated_model_rehashed": (truncated_model_rehashed, ("model.onnx", "onnxruntime cannot load")),
    "not_onnx": (not_onnx, ("onnxruntime cannot load",)),
    "truncated_tokenizer": (truncated_tokenizer, ("tokenizer.json", "cannot load tokenizer")),
    "swapped_tokenizer": (swapped_tokenizer, ("tokenizer.json: sha256", "does not match manifest checksums")),
    "bigger_tokenizer": (bigger_tokenizer, ("tokenizer.json has 30622 tokens", "config.json vocab_size is 30522")),
    "bigger_tokenizer_no_config": (bigger_tokenizer_no_config, ("model.onnx cannot embed token id 30621",)),
    "invalid_manifest": (invalid_manifest, ("manifest.json is invalid",)),
}


def broken_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    BROKEN[name][0](dst)
    return dst


def settled_reason(server: Server, timeout: float = 60.0) -> dict:
    """The /readyz error once loading has finished (it says 'loading' until then)."""
    deadline = time.monotonic() + timeout
    while True:
        err = assert_error(httpx.get(server.url + "/readyz", timeout=5), 503, "not_ready")
        if "loading" not in err["message"] or time.monotonic() > deadline:
            return err
        time.sleep(0.1)


def test_broken_folders_stay_not_ready_with_the_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    specs = {name: {"UNIGUARD_MODEL_DIR": str(broken_copy(tiny_model_dir, tmp_path / name, name))} for name in BROKEN}
    with servers(tmp_path, specs, ready=dict.fromkeys(specs, False)) as running:
        for name, server in running.items():
            err = settled_reason(server)
            for words in BROKEN[name][1]:
                assert words in err["message"], (name, err["message"])
            assert err["message"].startswith("model not loaded: ")
            r = httpx.post(server.url + "/v1/classify", json={"policy_id": "toxicity", "prompt": "hello"}, timeout=5)
            assert_error(r, 503, "not_ready")  # never a verdict from a broken folder
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
            assert server.proc.poll() is None


# -- the checks in-process ------------------------------------------------------------------


@pytest.fixture()
def copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_the_fixture_folder_passes_and_is_fingerprinted(tiny_model_dir: Path) -> None:
    model = load_and_validate(tiny_model_dir, threads=1)
    assert set(model.manifest.checksums) == {"tokenizer.json", "config.json"}


def test_config_position_table_shorter_than_the_window(copy: Path) -> None:
    _edit_config(copy, max_position_embeddings=64)
    _edit_manifest(copy, checksums={})
    with pytest.raises(ModelLoadError, match="max_position_embeddings 64 is below the manifest max_length 128"):
        load_and_validate(copy, threads=1)


def test_config_labels_disagreeing_with_the_manifest(copy: Path) -> None:
    _edit_config(copy, id2label={"0": "unsafe", "1": "safe"})  # swapped: every score would be inverted
    _edit_manifest(copy, checksums={})
    with pytest.raises(ModelLoadError, match="id2label"):
        load_and_validate(copy, threads=1)


def test_swapped_config_is_caught_by_its_checksum(copy: Path) -> None:
    _edit_config(copy, hidden_dropout_prob=0.3)
    with pytest.raises(ModelLoadError, match=r"config\.json: sha256 .* does not match manifest checksums"):
        load_and_validate(copy, threads=1)


def test_missing_fingerprinted_file(copy: Path) -> None:
    (copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        load_and_validate(copy, threads=1)


def test_policy_warnings(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    long = Policy(id="long", name="l", description="forbidden " * 199)
    warnings = policy_warnings(tiny_model, {**shipped_policies, "long": long}, {"toxicity": 0.7, "ghost": 0.2})
    assert any("'long'" in w and "policy_too_long" in w for w in warnings)
    assert any("ghost" in w for w in warnings)
    assert not any("toxicity" in w for w in warnings)
