"""Atomic writes: a crash leaves the old file or folder, never half of a new one.

Everything the pipeline writes (splits, checkpoints, model folders, indexes) goes through
these few functions: write to a hidden sibling, then rename into place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name next to ``path`` (same filesystem, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{tag}-{path.name}-{uuid.uuid4().hex[:8]}")


def atomic_replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Swap a finished folder into place; the old one is removed only after the swap."""
    out_dir = Path(out_dir)
    backup = out_dir.with_name(f".old-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(backup)
    try:
        Path(tmp_dir).rename(out_dir)
    except BaseException:
        if backup.exists():
            backup.rename(out_dir)
        raise
    if backup.exists():
        shutil.rmtree(backup)


@contextmanager
def staged_dir(out_dir: Path, *, copy_from: Path | None = None) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` (optionally a copy of ``copy_from``) that replaces
    ``out_dir`` atomically when the block ends without an error, and vanishes otherwise."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(out_dir)
    try:
        if copy_from is not None:
            shutil.copytree(copy_from, staging)
        else:
            staging.mkdir()
        yield staging
        atomic_replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_tree_atomic(src: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by a copy of ``src`` in one rename."""
    with staged_dir(out_dir, copy_from=src):
        pass
