"""Service settings: the one place configuration is read, from ``UNIGUARD_*`` env vars.

There is deliberately no module-level settings object: ``create_app`` takes a ``Settings``
so tests and embedders can run several differently configured apps in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.policy import DEFAULT_POLICIES_DIR


def _default_threads() -> int:
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Everything an operator can tune; env var = ``UNIGUARD_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="UNIGUARD_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(Path("models/default"), description="Model folder (model.onnx, tokenizer.json, manifest.json).")
    policies_dir: Path = Field(DEFAULT_POLICIES_DIR, description="Folder of *.yaml policies served by id.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    threads: int = Field(default_factory=_default_threads, ge=1, description="onnxruntime intra-op threads.")
    max_batch_size: int = Field(32, ge=1, description="Most windows run in one model call.")
    max_wait_ms: float = Field(2.0, ge=0.0, description="Longest a window waits for batch-mates.")
    max_queue: int = Field(1024, ge=1, description="Most windows waiting; beyond it requests get 429.")
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_policies_per_request: int = Field(16, ge=1)
    request_timeout_s: float = Field(10.0, gt=0.0)
    log_prompts: bool = Field(False, description="Put prompt text in access logs (off: prompts may hold personal data).")
