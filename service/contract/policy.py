"""Policy schema and the model-input contract shared by training and serving.

Training imports this module so that the text a model was trained on and the text the
service scores are built by the same code: a model is only as good as that agreement.
The instruction and the query are encoded as a tokenizer *pair*, so the separator between
them is the tokenizer's own ``[SEP]`` and the query side alone is split into windows.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Tokenizer

from service.contract.textnorm import hidden_payloads, normalize_text

POLICY_ID_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"


class PolicyExamples(BaseModel):
    model_config = ConfigDict(extra="forbid")

    safe: list[str] = Field(default_factory=list, max_length=1000)
    unsafe: list[str] = Field(default_factory=list, max_length=1000)


class Policy(BaseModel):
    """A written policy. Only ``description`` reaches the model; the rest documents it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=POLICY_ID_PATTERN, description="Stable identifier, e.g. prompt_injection.")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(
        min_length=1, max_length=2000, description="What the policy forbids; the model reads this text."
    )
    allowed: list[str] = Field(default_factory=list, max_length=200)
    disallowed: list[str] = Field(default_factory=list, max_length=200)
    examples: PolicyExamples = Field(default_factory=PolicyExamples)

    def description_sha256(self) -> str:
        """Fingerprint of the text the model reads; a model trained on another text is zero-shot for it."""
        return _fingerprint(self.description)


@functools.lru_cache(maxsize=4096)
def _fingerprint(description: str) -> str:
    """Cached: every verdict asks (1 % of a request's event-loop time uncached); bounded, as
    inline policies bring arbitrary texts (at most 4096 x 2000 characters)."""
    return hashlib.sha256(description.strip().encode()).hexdigest()


class PolicyFileError(ValueError):
    """A policy file that cannot be used; the message names the file and the reason."""


# A policy is a few kB of YAML; anything far larger is not one (and would stall a reload).
MAX_POLICY_FILE_BYTES = 1 << 20


def read_regular_file(path: Path, max_bytes: int = MAX_POLICY_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks to one included) of at most
    ``max_bytes``; PolicyFileError otherwise.

    Opened non-blocking and checked on the open descriptor (no race with a rename): a FIFO
    named ``*.yaml`` would otherwise block the reader, and the reload holding its lock, until
    some writer showed up; a device would stream for ever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read policy: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PolicyFileError(f"{path}: not a regular file (only regular *.yaml files are read as policies)")
        data = fh.read(max_bytes + 1) if info.st_size <= max_bytes else b""
        if info.st_size > max_bytes or len(data) > max_bytes:
            raise PolicyFileError(f"{path}: larger than a policy file may be ({max_bytes} bytes)")
        return data


def load_policy_file(path: Path) -> Policy:
    try:
        data = yaml.safe_load(read_regular_file(path).decode("utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"{path}: cannot read policy: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyFileError(f"{path}: invalid policy: {exc}") from exc


def load_policies(directory: Path) -> dict[str, Policy]:
    """Load every ``*.yaml`` policy of a folder, keyed by id; duplicate ids are an error."""
    policies: dict[str, Policy] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        policy = load_policy_file(path)
        if policy.id in policies:
            raise PolicyFileError(f"{path}: duplicate policy id {policy.id!r}")
        policies[policy.id] = policy
    return policies


DEFAULT_POLICIES_DIR = Path(__file__).parents[1] / "policies"


class InputTemplate(BaseModel):
    """How a (policy, prompt) pair becomes model text; stored in every model manifest."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = "Instruct: {description}"
    query: str = "Query: {prompt}"

    def instruction_text(self, policy: Policy) -> str:
        return self.instruction.format(description=policy.description.strip())

    def query_text(self, prompt: str) -> str:
        """The query side, prompt Unicode-normalised (``service.contract.textnorm``): both sides go through here."""
        return self.query.format(prompt=normalize_text(prompt))


class InstructionTooLong(ValueError):
    """The policy description leaves no room for the prompt in the model window."""


@dataclass(frozen=True)
class EncodedWindows:
    """All windows of one (policy, prompt) pair, as int64 rows without padding."""

    input_ids: list[np.ndarray]
    attention_mask: list[np.ndarray]
    token_type_ids: list[np.ndarray]

    @property
    def count(self) -> int:
        return len(self.input_ids)

    @cached_property  # O(windows): counted once (where the batcher prepares a job, off the event loop)
    def tokens(self) -> int:
        return int(sum(len(ids) for ids in self.input_ids))


# The query side must keep at least this many tokens per window, or windows degenerate.
MIN_QUERY_TOKENS = 16


class InputEncoder:
    """Turns (policy, prompt) into model windows, never silently truncating the prompt.

    The tokenizer truncates only the query side and returns the rest as overflowing
    windows that overlap by ``stride`` tokens, so text cut at a window edge is seen whole
    in the next window.
    """

    def __init__(self, tokenizer: Tokenizer, template: InputTemplate, max_length: int, stride: int) -> None:
        if not 0 <= stride < max_length // 2:
            raise ValueError(f"stride {stride} must be below half of max_length {max_length}")
        self.template = template
        self.max_length = max_length
        self.stride = stride
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length, stride=stride, strategy="only_second")
        # A copy without truncation counts instruction tokens: the truncating one refuses a
        # lone sequence and cannot say by how much a long description overflows.
        self._counter = Tokenizer.from_str(tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        # Tokens added around a pair: [CLS] a [SEP] b [SEP] for BERT.
        self._special_pair = tokenizer.post_processor.num_special_tokens_to_add(True) if tokenizer.post_processor else 0
        self._instruction_counts: dict[str, int] = {}

    @classmethod
    def from_file(cls, tokenizer_json: Path, template: InputTemplate, max_length: int, stride: int) -> InputEncoder:
        return cls(Tokenizer.from_file(str(tokenizer_json)), template, max_length, stride)

    def vocabulary(self) -> dict[str, int]:
        """Token -> id of the tokenizer, added tokens included."""
        vocab: dict[str, int] = self._tokenizer.get_vocab(with_added_tokens=True)  # tokenizers ships no types
        return vocab

    def token_id(self, token: str) -> int | None:
        """The id of one token (``[PAD]``, ``[CLS]``...), None if the tokenizer has no such token."""
        tid = self._tokenizer.token_to_id(token)
        return None if tid is None else int(tid)

    def instruction_tokens(self, policy: Policy) -> int:
        text = self.template.instruction_text(policy)
        count = self._instruction_counts.get(text)
        if count is None:  # once per description: it is checked on every request
            count = len(self._counter.encode(text, add_special_tokens=False).ids)
            if len(self._instruction_counts) >= 4096:  # inline policies are request data: bound the cache
                self._instruction_counts.clear()
            self._instruction_counts[text] = count
        return count

    def check_policy(self, policy: Policy) -> None:
        """Raise InstructionTooLong if this policy cannot share a window with a prompt."""
        room = self.max_length - self._special_pair - self.instruction_tokens(policy)
        if room < MIN_QUERY_TOKENS:
            raise InstructionTooLong(
                f"policy {policy.id!r}: description uses {self.max_length - self._special_pair - room} of "
                f"{self.max_length} tokens, leaving {room} for the prompt (need {MIN_QUERY_TOKENS})"
            )

    def encode(self, policy: Policy, prompt: str) -> EncodedWindows:
        """Every window of the prompt, then every window of each readable base64 payload in it.

        A payload's windows count like the prompt's (admission, budget): the max over all
        windows is the verdict, so an instruction hidden in base64 is judged decoded."""
        return self.encode_queries(policy, self.query_texts(prompt))

    def query_texts(self, prompt: str) -> list[str]:
        """The query side of every text ``encode`` scores for ``prompt`` (the prompt, then each
        readable base64 payload), normalised: what the model sees of the prompt, whatever the policy."""
        return [self.template.query_text(text) for text in [prompt, *hidden_payloads(prompt)]]

    def encode_queries(self, policy: Policy, queries: list[str]) -> EncodedWindows:
        """``encode`` for query texts already built by ``query_texts`` (once per prompt, not per policy)."""
        self.check_policy(policy)
        instruction = self.template.instruction_text(policy)
        windows = []
        for query in queries:
            first = self._tokenizer.encode(instruction, query)
            windows += [first, *first.overflowing]
        return EncodedWindows(
            input_ids=[np.asarray(w.ids, dtype=np.int64) for w in windows],
            attention_mask=[np.asarray(w.attention_mask, dtype=np.int64) for w in windows],
            token_type_ids=[np.asarray(w.type_ids, dtype=np.int64) for w in windows],
        )

    def encode_query_windows(
        self, instruction: str, query: str
    ) -> list[tuple[list[int], list[int], list[int], tuple[int, int]]]:
        """Every window of (instruction, query) with the [start, end) characters of ``query`` it holds.

        Training labels windows by where an unsafe span falls; serving never needs offsets."""
        first = self._tokenizer.encode(instruction, query)
        out = []
        for w in [first, *first.overflowing]:
            spans = [off for off, seq in zip(w.offsets, w.sequence_ids, strict=True) if seq == 1 and off[1] > off[0]]
            covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
            out.append((w.ids, w.attention_mask, w.type_ids, covered))
        return out

    def encode_first_window(self, instruction: str, query: str) -> tuple[list[int], list[int], list[int]]:
        """The first window only: what training uses for one example (ids, mask, type ids)."""
        enc = self._tokenizer.encode(instruction, query)
        return enc.ids, enc.attention_mask, enc.type_ids


def pad_batch(rows: list[np.ndarray], pad_id: int = 0) -> np.ndarray:
    """Right-pad int64 rows into one [batch, longest] array."""
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), longest), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
