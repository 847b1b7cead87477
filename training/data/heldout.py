"""The out-of-source rows: whole sources kept out of training, and the near-duplicates they rule out.

A validation split drawn from the training sources only bounds quality from above: the
model has seen those sources' styles. What ships is decided on rows of sources it never
trained on (``EVAL_ONLY_FILES`` and the hand-written held-out file), so every training row
that nearly repeats one of their texts is dropped first (in-the-wild jailbreak collections
overlap; Alpaca's harmful side pools the behaviour sets).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path

from training.data.rows import Example, normalise, read_examples
from training.data.sources import EVAL_BENIGN_POLICIES

SHINGLE = 5  # words per shingle for the near-duplicate test
NEAR_DUP_OVERLAP = 0.5  # a training text sharing this fraction of its shingles with held-out text is dropped
HELDOUT_CAP = 400  # rows per (policy, source, label): bounds the release's scoring time
HELDOUT_DIR = Path(__file__).resolve().parents[1] / "eval" / "heldout"
HANDWRITTEN_HELDOUT = HELDOUT_DIR / "handwritten_heldout.jsonl"
ZERO_SHOT_ROWS = HELDOUT_DIR / "zeroshot.jsonl"
ZERO_SHOT_POLICIES = HELDOUT_DIR / "policies"


def _shingles(text: str) -> set[int]:
    words = normalise(text).split()
    if len(words) < 2 * SHINGLE:  # a short text: only an exact (normalised) repeat counts
        return {hash(" ".join(words))}
    return {hash(" ".join(words[i : i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


class NearDuplicateIndex:
    """Shingles of the held-out texts; ``covers`` says whether a text mostly repeats them."""

    def __init__(self, texts: list[str]) -> None:
        self._index: set[int] = set()
        for text in texts:
            self._index |= _shingles(text)

    def covers(self, text: str) -> bool:
        sh = _shingles(text)
        return bool(sh) and len(sh & self._index) >= NEAR_DUP_OVERLAP * len(sh)


def half_of(text: str) -> str:
    """``tune`` or ``test``: a fixed half of the held-out rows by text hash.

    Thresholds are chosen on the tune half (FPR bound on held-out benign sources); every
    out-of-source figure is reported on the test half, which nothing was fitted on."""
    digest = hashlib.sha256(normalise(text).encode()).digest()
    return "tune" if digest[0] % 2 == 0 else "test"


def heldout_rows(eval_public: list[Example], policies: set[str], seed: int, cap: int = HELDOUT_CAP) -> list[Example]:
    """Evaluation-only public rows plus the hand-written held-out file, lent and capped.

    Benign rows of a file in ``EVAL_BENIGN_POLICIES`` are scored under each policy listed
    there; unsafe rows only under their own policy. One copy per (policy, text)."""
    rng = random.Random(seed)
    rows: list[Example] = []
    for ex in eval_public:
        if ex.label == 0 and ex.source in EVAL_BENIGN_POLICIES:
            rows += [Example(ex.text, 0, pid, ex.source, ex.category) for pid in EVAL_BENIGN_POLICIES[ex.source]]
        else:
            rows.append(ex)
    if HANDWRITTEN_HELDOUT.exists():
        rows += read_examples(HANDWRITTEN_HELDOUT)
    groups: dict[tuple[str, str, int], dict[str, Example]] = defaultdict(dict)
    seen: set[tuple[str, str]] = set()  # the same forbidden question sits in two files: count it once
    for ex in rows:
        key = (ex.policy_id, normalise(ex.text))
        if ex.policy_id in policies and key not in seen:
            seen.add(key)
            groups[(ex.policy_id, ex.source, ex.label)][key[1]] = ex
    out: list[Example] = []
    for key in sorted(groups):
        picked = sorted(groups[key].values(), key=lambda e: e.text)
        rng.shuffle(picked)
        out += picked[:cap]
    return out


def zero_shot_rows() -> list[Example]:
    """Hand-written rows of policies no model trains on (medical and legal advice)."""
    return read_examples(ZERO_SHOT_ROWS) if ZERO_SHOT_ROWS.exists() else []
