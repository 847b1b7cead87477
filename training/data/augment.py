"""Training rows where the unsafe part sits inside benign text, and benign rows with noise.

The service scores every window of a prompt and answers with the worst one, so what the
model must learn is per window: a window holding an injection is unsafe, a window of the
benign email around it is not. Rows built here carry the unsafe part's ``span``; the batch
encoder (``training.model.batches``) labels windows by it. Texts are normalised
(``service.textnorm``) before offsets are taken, so spans stay valid through the encoder.
"""

from __future__ import annotations

import base64
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator

from service.contract.textnorm import normalize_text
from training.data.rows import Example, normalise

MAX_EMBEDDED_CHARS = 280  # unsafe texts short enough to sit inside one window whole
CONTEXT_CHARS = (0, 3000)  # benign text around an embedded unsafe row, before + after


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def context_groups(rows: list[Example], edge: int = 150) -> dict[str, str]:
    """normalised text -> group key: BIPIA pairs (one context with and without an inserted
    instruction) share their first or last ``edge`` characters, and must split together."""
    keys = [normalise(ex.text) for ex in rows]
    parent = list(range(len(rows)))
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        for part in (f"<{key[:edge]}", f">{key[-edge:]}"):
            if part in first:
                parent[_find(parent, i)] = _find(parent, first[part])
            else:
                first[part] = i
    return {keys[i]: f"ctx:{keys[_find(parent, i)][:40]}:{_find(parent, i)}" for i in range(len(rows))}


def inserted_spans(rows: list[Example]) -> list[Example]:
    """Unsafe BIPIA rows with the span of the inserted instruction, found against their benign
    twin; unsafe rows without a twin are dropped (no way to tell which window holds it)."""
    benign = [normalize_text(ex.text) for ex in rows if ex.label == 0]
    by_edge: dict[str, list[str]] = defaultdict(list)
    for text in benign:
        by_edge[text[:150]].append(text)
        by_edge[text[-150:]].append(text)
    out: list[Example] = []
    for ex in rows:
        if ex.label == 0:
            out.append(ex)
            continue
        text = normalize_text(ex.text)
        twins = by_edge.get(text[:150], []) + by_edge.get(text[-150:], [])
        if not twins:
            continue
        start, end = _inserted(twins[0], text)
        if end - start < 10:
            continue
        out.append(Example(text, 1, ex.policy_id, ex.source, ex.category, ex.rationale, (start, end)))
    return out


def _inserted(context: str, text: str) -> tuple[int, int]:
    """[start, end) of what ``text`` adds to ``context``: BIPIA inserts one instruction, so
    the common prefix and the common suffix bound it."""
    limit = min(len(context), len(text))
    p = 0
    while p < limit and context[p] == text[p]:
        p += 1
    q = 0
    while q < limit - p and context[-1 - q] == text[-1 - q]:
        q += 1
    return p, len(text) - q


def _per_policy(rows: Iterable[Example], n: int, rng: random.Random) -> Iterator[tuple[str, list[Example]]]:
    """Up to ``n`` rows per policy, policies in order, each drawn by a seeded shuffle when its
    turn comes (so the caller's own draws between policies keep the same sequence)."""
    by_policy: dict[str, list[Example]] = defaultdict(list)
    for ex in rows:
        by_policy[ex.policy_id].append(ex)
    for pid in sorted(by_policy):
        picked = sorted(by_policy[pid], key=lambda e: e.text)
        rng.shuffle(picked)
        yield pid, picked[:n]


def _context(pool: list[str], n_chars: int, rng: random.Random) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < n_chars and pool:
        parts.append(rng.choice(pool))
    return " ".join(parts)[:n_chars]


def embed_in_context(train: list[Example], per_policy: int, rng: random.Random) -> list[Example]:
    """Short unsafe training rows placed at a random point of benign training text (0-3,000
    characters around them), as new rows with the unsafe row's span."""
    pool = [normalize_text(ex.text) for ex in train if ex.label == 0 and ex.span is None and len(ex.text) < 2000]
    short_unsafe = (ex for ex in train if ex.label == 1 and ex.span is None and len(ex.text) <= MAX_EMBEDDED_CHARS)
    out: list[Example] = []
    for pid, rows in _per_policy(short_unsafe, per_policy, rng):
        for ex in rows:
            total = rng.randint(*CONTEXT_CHARS)
            before = _context(pool, rng.randint(0, total), rng)
            after = _context(pool, total - len(before), rng)
            unsafe = normalize_text(ex.text)
            head = f"{before}\n\n" if before else ""
            text = f"{head}{unsafe}{' ' + after if after else ''}"
            out.append(
                Example(text, 1, pid, f"embedded:{ex.source}", ex.category, None, (len(head), len(head) + len(unsafe)))
            )
    return out


def with_binary_blobs(train: list[Example], per_policy: int, rng: random.Random) -> list[Example]:
    """Benign rows with a base64 blob of random bytes (an image, a key) pasted in: safe."""
    benign = (ex for ex in train if ex.label == 0 and ex.span is None and len(ex.text) < 1500)
    out: list[Example] = []
    for pid, rows in _per_policy(benign, per_policy, rng):
        for ex in rows:
            blob = base64.b64encode(rng.randbytes(rng.randint(24, 240))).decode()
            text = f"{ex.text}\n{blob}" if rng.random() < 0.5 else f"{blob}\n{ex.text}"
            out.append(Example(text, 0, pid, f"blob:{ex.source}", ex.category))
    return out
