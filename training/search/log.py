"""The trial log: one JSON object per line, appended as each trial finishes.

It is both the record (every trial's weights, type, method, strategy and F1) and the resume
point: a rerun reads it back, replays each strategy's history and continues after the last
logged iteration, so no trial is evaluated twice. The first line describes the search
(sources, validation hash, hyper-parameters); a log written for another search is refused
rather than silently mixed. A line cut short by a crash is dropped on reopening.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

LOG_VERSION = 1


class LogMismatch(ValueError):
    """The log on disk belongs to a different search (other sources, data or settings)."""


class TrialLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    def open(self, meta: dict[str, Any]) -> list[dict[str, Any]]:
        """Create the log with ``meta`` or reopen it; returns the records already there."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Through JSON once, so tuples compare equal to the lists read back from disk.
        meta = json.loads(json.dumps({"kind": "meta", "version": LOG_VERSION, **meta}))
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.records = []
            self._write(meta, mode="w")
            return []
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):  # a crash mid-append: drop the partial line
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as fh:
                fh.truncate(len(raw))
        lines = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("kind") != "meta":
            raise LogMismatch(f"{self.path}: not a merge-search trial log (no meta line)")
        diff = sorted(
            k for k in set(meta) | set(lines[0]) if k not in ("created_at",) and meta.get(k) != lines[0].get(k)
        )
        if diff:
            raise LogMismatch(
                f"{self.path} was written by a different search (differs in: {', '.join(diff)}); "
                "use another --log/--run-dir or delete it"
            )
        self.records = lines[1:]
        return list(self.records)

    def append(self, record: dict[str, Any]) -> None:
        self._write(record, mode="a")
        self.records.append(record)

    def _write(self, record: dict[str, Any], mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def trials(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Trials per (method, strategy), in iteration order."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in self.of_kind("trial"):
            out[(r["method"], r["strategy"])].append(r)
        for v in out.values():
            v.sort(key=lambda r: r["iteration"])
        return dict(out)
