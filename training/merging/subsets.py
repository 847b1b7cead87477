"""Parameter subsets: which tensors a merge touches (the search's merge "type").

Selected by parameter name with regular expressions, so a subset written for BERT names
(``bert.encoder.layer.3.attention.output.dense.weight``) is data, not code: a YAML/JSON
file can add or override subsets without touching the merger. Tensors outside the subset
are taken unchanged from the host model (the top-1 source), which is also how "all but the
classification head" keeps the head of the best checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

HEAD_PATTERNS = [r"^classifier\.", r"^pre_classifier\.", r"^score\."]


class ParameterSubset(BaseModel):
    """A named selection: a name is selected if it matches an ``include`` and no ``exclude`` (re.search)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_\-]{1,40}$")
    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = ()
    description: str = ""

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"bad regular expression {p!r}: {exc}") from None
        return patterns

    @cached_property
    def _include(self) -> list[re.Pattern[str]]:
        return [re.compile(p) for p in self.include]

    @cached_property
    def _exclude(self) -> list[re.Pattern[str]]:
        return [re.compile(p) for p in self.exclude]

    def selects(self, name: str) -> bool:
        return any(p.search(name) for p in self._include) and not any(p.search(name) for p in self._exclude)

    def select(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.selects(n)]


BUILTIN_SUBSETS: dict[str, ParameterSubset] = {
    s.name: s
    for s in (
        ParameterSubset(name="all", description="every parameter, classification head included"),
        ParameterSubset(
            name="attention",
            include=(r"\.attention\.",),
            description="self-attention q/k/v, attention output dense and its LayerNorm, every layer",
        ),
        ParameterSubset(
            name="attention_output",
            include=(r"\.attention\.output\.dense\.",),
            description="attention output projection (dense) of every layer",
        ),
        ParameterSubset(
            name="no_head",
            exclude=tuple(HEAD_PATTERNS),
            description="everything but the classification head, which comes from the top-1 model",
        ),
    )
}


class SubsetFileError(ValueError):
    """A subsets file that cannot be used; the message names the file."""


def load_subsets(path: Path | None = None) -> dict[str, ParameterSubset]:
    """Built-in subsets, extended or overridden by ``{name: {include: [...], exclude: [...]}}`` from YAML/JSON."""
    subsets = dict(BUILTIN_SUBSETS)
    if path is None:
        return subsets
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SubsetFileError(f"{path}: cannot read subsets: {exc}") from exc
    if not isinstance(data, dict):
        raise SubsetFileError(f"{path}: expected a mapping of subset name to {{include, exclude}}")
    for name, spec in data.items():
        try:
            subsets[name] = ParameterSubset.model_validate({"name": name, **(spec or {})})
        except (ValidationError, TypeError) as exc:
            raise SubsetFileError(f"{path}: subset {name!r}: {exc}") from exc
    return subsets
