"""The balanced multi-policy training set, before any split.

Public data is mapped to policies, deduplicated across files before any split, capped per
source so that no source (long jailbreak dumps, 25k Alpaca rows) dominates a policy, mixed
with hand-written examples and with cross-policy negatives (a prompt that breaks one policy
is usually fine under another: that is what makes the model read the instruction), then
split train / held-out, stratified by policy, source and label, every copy of a text on
one side.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import train_test_split

from training.data.rows import Example, normalise, read_examples
from training.data.sources import (
    BENIGN_POOL_FILES,
    CROSS_NEGATIVES,
    CROSS_SKIP_CATEGORIES,
    POOL_TOPIC_EXCLUDE,
    load_public,
)


@dataclass
class Budget:
    """Caps that keep one source from dominating a policy (rows per source and label)."""

    per_source_unsafe: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_injection": 380,
            "toxicity": 1000,
            "content_safety": 320,
            "financial_advice": 1000,
            "tax_advice": 1000,
        }
    )
    per_source_safe: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_injection": 420,
            "toxicity": 800,
            "content_safety": 600,
            "financial_advice": 1000,
            "tax_advice": 1000,
        }
    )
    benign_pool: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_injection": 400,
            "toxicity": 300,
            "content_safety": 400,
            "financial_advice": 350,
            "tax_advice": 350,
        }
    )
    cross_negatives: int = 160  # per (source policy -> target policy) pair
    # Few, precise rows aimed at known failure modes (hand-written near-misses, short and
    # German injections) are repeated in training, never in validation.
    source_repeat: dict[str, int] = field(default_factory=lambda: {"handwritten": 2, "deepset_prompt_injections": 2})


def dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    """Drop repeats of (policy, normalised text); on conflicting labels keep the unsafe one."""
    best: dict[tuple[str, str], Example] = {}
    for ex in examples:
        key = (ex.policy_id, normalise(ex.text))
        if not key[1]:
            continue
        if key not in best or (ex.label > best[key].label):
            best[key] = ex
    return list(best.values()), len(examples) - len(best)


@dataclass
class Dataset:
    train: list[Example]
    validation: list[Example]
    stats: dict[str, object]


def _cap(rows: list[Example], n: int, rng: random.Random) -> list[Example]:
    rows = sorted(rows, key=lambda e: e.text)
    rng.shuffle(rows)
    return rows[:n]


def build_dataset(
    data_dir: Path,
    example_files: list[Path],
    policies: set[str],
    *,
    val_fraction: float = 0.15,
    seed: int = 13,
    budget: Budget | None = None,
) -> Dataset:
    """Balanced rows of every policy, split train / held-out (``val_fraction`` of the texts)."""
    budget = budget or Budget()
    rng = random.Random(seed)
    public = load_public(data_dir)
    handwritten: list[Example] = []
    for path in example_files:
        handwritten.extend(read_examples(path, policies))
    all_rows, dropped_dupes = dedupe(public + handwritten)

    # Benign pool: safe public rows of general-purpose files, one copy per text.
    pool_by_text: dict[str, Example] = {}
    for ex in all_rows:
        if ex.label == 0 and ex.source in BENIGN_POOL_FILES:
            pool_by_text.setdefault(normalise(ex.text), ex)
    pool = sorted(pool_by_text.values(), key=lambda e: e.text)
    rng.shuffle(pool)

    by_policy_source: dict[tuple[str, str, int], list[Example]] = defaultdict(list)
    for ex in all_rows:
        if ex.policy_id in policies:
            by_policy_source[(ex.policy_id, ex.source, ex.label)].append(ex)

    chosen: list[Example] = []
    for (pid, source, label), rows in sorted(by_policy_source.items()):
        if source == "handwritten":
            chosen.extend(rows)
            continue
        cap = (budget.per_source_unsafe if label else budget.per_source_safe)[pid]
        chosen.extend(_cap(rows, cap, rng))

    taken = {(ex.policy_id, normalise(ex.text)) for ex in chosen}
    pool_iter = 0
    for pid in sorted(policies):
        n = budget.benign_pool.get(pid, 300)
        added = 0
        while added < n and pool_iter < len(pool):
            ex = pool[pool_iter]
            pool_iter += 1
            if (pid, normalise(ex.text)) in taken:
                continue
            topic = POOL_TOPIC_EXCLUDE.get(pid)
            if topic is not None and topic.search(ex.text):
                continue
            chosen.append(Example(ex.text, 0, pid, f"benign:{ex.source}", ex.category))
            taken.add((pid, normalise(ex.text)))
            added += 1

    unsafe_by_policy: dict[str, list[Example]] = defaultdict(list)
    for ex in chosen:
        if ex.label == 1:
            unsafe_by_policy[ex.policy_id].append(ex)
    for src_pid, targets in CROSS_NEGATIVES.items():
        if src_pid not in policies:
            continue
        for tgt in targets:
            if tgt not in policies:
                continue
            lendable = [ex for ex in unsafe_by_policy[src_pid] if ex.category not in CROSS_SKIP_CATEGORIES]
            for ex in _cap(lendable, budget.cross_negatives, rng):
                key = (tgt, normalise(ex.text))
                if key in taken:
                    continue
                chosen.append(Example(ex.text, 0, tgt, f"cross:{src_pid}", ex.category))
                taken.add(key)

    # Split by text (all copies of a text on one side), stratified by its first stratum.
    strata: dict[str, str] = {}
    for ex in chosen:
        strata.setdefault(normalise(ex.text), f"{ex.policy_id}|{ex.source.split(':')[0]}|{ex.label}")
    texts = sorted(strata)
    labels = [strata[t] for t in texts]
    counts = Counter(labels)
    labels = [s if counts[s] >= 2 else "rare" for s in labels]
    _train_texts, val_texts = train_test_split(texts, test_size=val_fraction, random_state=seed, stratify=labels)
    val_set = set(val_texts)
    train = [ex for ex in chosen if normalise(ex.text) not in val_set]
    validation = [ex for ex in chosen if normalise(ex.text) in val_set]
    train = train + [ex for ex in train for _ in range(budget.source_repeat.get(ex.source, 1) - 1)]
    rng.shuffle(train)
    stats = {"duplicates_removed": dropped_dupes, "public_rows": len(public), "handwritten_rows": len(handwritten)}
    return Dataset(train=train, validation=validation, stats=stats)
