"""The paper's training stages, one module each: ``taskguard`` (one guard per policy),
``multitaskguard`` (GIP, then per-policy fine-tunes), ``default`` (the shipped model, a
preset of the same loop); ``finetune`` holds what they share."""

from __future__ import annotations

from pathlib import Path


class StageConfigMismatch(RuntimeError):
    """A finished checkpoint exists for a different configuration: rerun with --force or a new run
    name. Here, not in ``finetune``, so the CLI can catch it without importing torch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} was trained with another configuration; use --force to retrain it or another --run name"
        )
