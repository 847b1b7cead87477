"""Resumable output: one append-only JSONL per policy plus a state file that commits it.

A batch is committed in two steps: its rows are appended and fsync'ed, then the state
file (batches done, byte length of the committed JSONL, counters, contested rows) is
replaced atomically. On start the JSONL is cut back to the committed length, so a run
killed between the two steps, or in the middle of a write, resumes without duplicated or
torn rows. Hand edits that shorten the file are refused rather than guessed at.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SOURCE = "synthetic"


@dataclass
class Candidate:
    """A generated prompt before it is accepted (dedup, review) and written."""

    text: str
    label: int
    rationale: str
    category: str
    method: str  # "llm" or "template"
    origin: str | None = None  # the template text a paraphrase was made from
    relabelled: bool = False

    def to_row(self, policy_id: str, generator: str, batch: int) -> dict[str, Any]:
        """training.data.ExampleRow fields first; the rest is ignored by the reader, kept for audits."""
        return {
            "text": self.text,
            "label": self.label,
            "policy_id": policy_id,
            "source": SOURCE,
            "category": self.category,
            "rationale": self.rationale,
            "generator": generator,
            "method": self.method,
            "relabelled": self.relabelled,
            "batch": batch,
        }


@dataclass
class Counters:
    """Per-policy totals, carried across resumed runs; the final table prints them."""

    batches: int = 0
    generated: int = 0  # candidates produced (LLM items + template prompts)
    malformed: int = 0  # answers that failed JSON/pydantic validation (each retry counts)
    skipped_calls: int = 0  # calls abandoned after their malformed retries
    failed_calls: int = 0  # calls that failed at the backend (HTTP errors, timeouts)
    filtered: int = 0  # too short/long, refusal or chatter, bad paraphrase without fallback
    duplicates: int = 0  # exact or near-duplicate (embedding cosine) of kept or earlier rows
    paraphrased: int = 0  # template prompts rewritten by the LLM
    paraphrase_rejected: int = 0  # rewrites dropped (meaning drift, chatter); template text kept
    reviewed: int = 0
    relabelled: int = 0
    dropped_review: int = 0
    kept: int = 0

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Counters:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


@dataclass
class State:
    policy_id: str
    generator: str = ""
    batches_done: int = 0
    committed_bytes: int = 0
    counts: Counters = field(default_factory=Counters)
    contested: list[dict[str, Any]] = field(default_factory=list)  # review disagreements, for refinement
    refined: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = asdict(self.counts)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        data = dict(data)
        data["counts"] = Counters.from_dict(data.get("counts", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StoreError(RuntimeError):
    """The output and its state file disagree in a way that cannot be repaired safely."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PolicyStore:
    """``sdg_<policy>.jsonl`` and ``sdg_<policy>.state.json`` in one output folder."""

    def __init__(self, out_dir: Path, policy_id: str) -> None:
        self.out_dir = Path(out_dir)
        self.policy_id = policy_id
        self.rows_path = self.out_dir / f"sdg_{policy_id}.jsonl"
        self.state_path = self.out_dir / f"sdg_{policy_id}.state.json"

    def open(self) -> State:
        """Load (or start) the state and cut the JSONL back to its last committed byte."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = State(self.policy_id)
        if self.state_path.exists():
            state = State.from_json(json.loads(self.state_path.read_text(encoding="utf-8")))
        size = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        if size < state.committed_bytes:
            raise StoreError(
                f"{self.rows_path} is shorter ({size} B) than its committed length "
                f"({state.committed_bytes} B): remove {self.state_path.name} to start over"
            )
        if size > state.committed_bytes:  # an uncommitted or torn batch from a killed run
            with open(self.rows_path, "r+b") as fh:
                fh.truncate(state.committed_bytes)
                fh.flush()
                os.fsync(fh.fileno())
        return state

    def rows(self) -> list[dict[str, Any]]:
        if not self.rows_path.exists():
            return []
        with open(self.rows_path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def commit(self, rows: list[dict[str, Any]], state: State) -> None:
        """Append rows durably, then record the new committed length atomically."""
        with open(self.rows_path, "ab") as fh:
            for row in rows:
                fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            state.committed_bytes = fh.tell()
        self.save_state(state)

    def save_state(self, state: State) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state.to_json(), fh, indent=1, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.state_path)
        _fsync_dir(self.out_dir)
