from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.contract.policy import DEFAULT_POLICIES_DIR


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("UNIGUARD_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.model_dir == Path("models/default")
    assert s.policies_dir == DEFAULT_POLICIES_DIR
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.threads == (os.cpu_count() or 1)
    assert (s.max_batch_size, s.max_wait_ms, s.max_queue) == (8, 0.0, 1024)  # continuous batching: no idle wait
    assert (s.max_batch_tokens, s.max_padding, s.provider, s.spinning) == (4096, 0.2, "auto", True)
    assert (s.max_body_bytes, s.max_prompt_chars, s.max_policies_per_request) == (1_000_000, 100_000, 16)
    assert s.request_timeout_s == 10 and s.log_prompts is False


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIGUARD_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("UNIGUARD_PORT", "9000")
    monkeypatch.setenv("UNIGUARD_THREADS", "3")
    monkeypatch.setenv("UNIGUARD_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("UNIGUARD_LOG_PROMPTS", "true")
    s = Settings()
    assert s.model_dir == tmp_path and s.port == 9000 and s.threads == 3
    assert s.max_wait_ms == 0.5 and s.log_prompts is True


def test_invalid_env_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIGUARD_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
