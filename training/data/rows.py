"""The labelled row every stage passes around, and the one way to read and write JSONL of them.

Lines are split on ``\\n`` only: texts may hold U+2028 / U+0085, which ``str.splitlines``
would treat as line breaks and so cut a row in two.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.contract.policy import Policy
from training.io import write_text_atomic


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    policy_id: str
    source: str
    category: str | None = None
    rationale: str | None = None
    # Characters [start, end) of ``text`` that make an unsafe row unsafe, when the rest is
    # benign context (an injection inside an email, an unsafe request inside chat text):
    # training labels the windows holding the span unsafe and the windows clear of it safe.
    # Offsets are into ``text``, which such rows store already normalised (service.textnorm).
    span: tuple[int, int] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["span"] is None:
            del data["span"]
        return json.dumps(data, ensure_ascii=False)


class ExampleRow(BaseModel):
    """One row of a JSONL training file (hand-written, synthetic or a split file)."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    label: int = Field(ge=0, le=1)
    policy_id: str
    source: str = "handwritten"
    category: str | None = None
    rationale: str | None = None
    span: tuple[int, int] | None = None


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def normalise(text: str) -> str:
    """Key for deduplication: case, accents-as-composed, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w]+", " ", text)
    return " ".join(text.split())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file as a dict (file iteration splits on newlines only)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON: {exc}") from exc
    return rows


def read_examples(path: Path, known_policies: set[str] | None = None) -> list[Example]:
    """Read a JSONL of ExampleRow; unknown policies and malformed rows are errors, not skips."""
    out = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            r = ExampleRow.model_validate(row)
        except ValidationError as exc:
            raise DataError(f"{path}: row {lineno}: {exc}") from exc
        if known_policies is not None and r.policy_id not in known_policies:
            raise DataError(f"{path}: row {lineno}: unknown policy {r.policy_id!r}")
        out.append(Example(r.text, r.label, r.policy_id, r.source, r.category, r.rationale, r.span))
    return out


def write_examples(path: Path, rows: list[Example]) -> None:
    """One JSON object per line, written atomically."""
    write_text_atomic(path, "".join(ex.to_json() + "\n" for ex in rows))


def read_test_rows(
    path: Path, policies: dict[str, Policy], policy: str | None = None, limit: int | None = None
) -> list[Example]:
    """Any JSONL with ``text`` and ``label`` (0 safe, 1 unsafe), mapped to a policy.

    ``policy`` overrides every row's ``policy_id`` (needed for files without one, such as the
    public files of ``../shared/data``); rows must end on a policy of ``policies``.
    """
    out = []
    for lineno, row in enumerate(read_jsonl(Path(path)), 1):
        pid = policy or row.get("policy_id")
        if "text" not in row or row.get("label") not in (0, 1):
            raise DataError(f"{path}: row {lineno}: needs text and label 0/1")
        if pid not in policies:
            raise DataError(
                f"{path}: row {lineno}: policy {pid!r} unknown (pass --policy or a policies folder that has it)"
            )
        out.append(
            Example(
                row["text"],
                int(row["label"]),
                pid,
                row.get("source") or Path(path).stem,
                row.get("category"),
                row.get("rationale"),
            )
        )
        if limit and len(out) >= limit:
            break
    return out


def summary_rows(splits: Mapping[str, list[Example]]) -> list[tuple[str, str, int, float]]:
    """(policy, split, rows, unsafe fraction) for the printed tables, by policy then split order."""
    order = list(splits)
    out = []
    for name, rows in splits.items():
        by_pid: dict[str, list[int]] = defaultdict(list)
        for ex in rows:
            by_pid[ex.policy_id].append(ex.label)
        out += [(pid, name, len(labels), sum(labels) / len(labels)) for pid, labels in by_pid.items()]
    return sorted(out, key=lambda r: (r[0], order.index(r[1])))
