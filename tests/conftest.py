"""Shared fixtures: one tiny real model folder per test session (built in ~10 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import build_tiny_model_folder

# 128 tokens so every shipped policy description (up to ~55 tokens) leaves room for a
# prompt; at the default 64 only `toxicity` fits and the others answer policy_too_long.
TINY_MAX_LENGTH = 128
TINY_STRIDE = 32


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 ONNX + tokenizer + manifest, like a shipped model folder."""
    return build_tiny_model_folder(
        tmp_path_factory.mktemp("tiny") / "model", max_length=TINY_MAX_LENGTH, stride=TINY_STRIDE
    )


@pytest.fixture(scope="session")
def tiny_fp32_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture without int8 quantisation (exact pad invariance)."""
    return build_tiny_model_folder(
        tmp_path_factory.mktemp("tiny-fp32") / "model", max_length=TINY_MAX_LENGTH, stride=TINY_STRIDE, quantize=False
    )
