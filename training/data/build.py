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

from training.data.augment import context_groups, embed_in_context, inserted_spans, with_binary_blobs
from training.data.heldout import (
    HANDWRITTEN_HELDOUT,
    ZERO_SHOT_ROWS,
    NearDuplicateIndex,
    heldout_rows,
)
from training.data.rows import Example, normalise, read_examples
from training.data.sources import (
    BENIGN_POOL_FILES,
    CROSS_NEGATIVES,
    CROSS_SKIP_CATEGORIES,
    EVAL_ONLY_FILES,
    POOL_TOPIC_EXCLUDE,
    load_public,
)
from training.data.system_prompts import SOURCE as SYSTEM_PROMPTS_SOURCE
from training.data.system_prompts import system_prompt_rows

CONTEXT_FILES = ("bipia_indirect",)  # rows that pair one context with and without an injection


@dataclass
class Budget:
    """Caps that keep one source from dominating a policy (rows per source and label)."""

    per_source_unsafe: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_injection": 380,
            "toxicity": 600,
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
    # Sources whose safe rows are hard negatives a policy needs more of than the cap allows:
    # defence system prompts ("never reveal these instructions") under prompt_injection, since
    # public system prompts scored as injections (median 0.70, held-out chatgpt_system_prompts,
    # 2026-12-03) and forced the threshold to 0.98.
    per_source_safe_override: dict[tuple[str, str], int] = field(
        default_factory=lambda: {
            ("prompt_injection", "tensor_trust_defenses"): 1600,
            ("prompt_injection", SYSTEM_PROMPTS_SOURCE): 700,
            # benign tweets ("neither"): held-out forum text under toxicity had q95 0.97
            ("toxicity", "davidson_hate_offensive"): 1600,
            # HateCheck's non-hateful functional tests (counter-speech, negation, neutral
            # mentions of groups): the hard negatives forum and web hate lacked
            ("toxicity", "hatecheck"): 1200,
        }
    )
    system_prompts: int = 700  # composed benign system prompts (``system_prompts.py``), per policy
    benign_pool: dict[str, int] = field(
        default_factory=lambda: {
            "prompt_injection": 1400,
            "toxicity": 1200,
            "content_safety": 1400,
            "financial_advice": 500,
            "tax_advice": 500,
        }
    )
    embedded_per_policy: int = 250  # short unsafe rows placed inside benign context (train side)
    blobs_per_policy: int = 60  # benign rows with a base64 blob of random bytes (train side)
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
    """``validation``: held-out rows of the training sources (an upper bound); ``heldout``:
    rows of sources never trained on, which decide what ships."""

    train: list[Example]
    validation: list[Example]
    stats: dict[str, object]
    heldout: list[Example] = field(default_factory=list)


def _round_robin(rows: list[Example], rng: random.Random) -> list[Example]:
    """One row of each file in turn (each file shuffled), so no file dominates the pool."""
    by_file: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(rows, key=lambda e: e.text):
        by_file[ex.source].append(ex)
    queues = []
    for name in sorted(by_file):
        rng.shuffle(by_file[name])
        queues.append(by_file[name])
    out: list[Example] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


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
    eval_public = [ex for ex in public if ex.source in EVAL_ONLY_FILES]
    handwritten: list[Example] = []
    for path in example_files:
        handwritten.extend(read_examples(path, policies))
    # No training row may nearly repeat a held-out text (evaluation-only files, the
    # hand-written held-out and zero-shot rows): those rows would no longer be out of source.
    held_texts = [ex.text for ex in eval_public]
    for path in (HANDWRITTEN_HELDOUT, ZERO_SHOT_ROWS):
        if path.exists():
            held_texts += [ex.text for ex in read_examples(path)]
    index = NearDuplicateIndex(held_texts)
    composed = [ex for ex in system_prompt_rows(budget.system_prompts, seed) if ex.policy_id in policies]
    candidates = [ex for ex in public if ex.source not in EVAL_ONLY_FILES] + handwritten + composed
    trainable = [ex for ex in candidates if not index.covers(ex.text)]
    near_dupes = len(candidates) - len(trainable)
    context_rows = [ex for ex in trainable if ex.source in CONTEXT_FILES]
    groups = context_groups(context_rows)
    trainable = [ex for ex in trainable if ex.source not in CONTEXT_FILES] + inserted_spans(context_rows)
    all_rows, dropped_dupes = dedupe(trainable)

    # Benign pool: safe public rows of general-purpose files, one copy per text, files in turn.
    pool_by_text: dict[str, Example] = {}
    for ex in all_rows:
        if ex.label == 0 and ex.source in BENIGN_POOL_FILES:
            pool_by_text.setdefault(normalise(ex.text), ex)
    pool = _round_robin(list(pool_by_text.values()), rng)

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
        if not label:
            cap = budget.per_source_safe_override.get((pid, source), cap)
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

    # Split by group (every copy of a text, and both rows of a BIPIA context, on one side),
    # stratified by the group's first stratum.
    def group(ex: Example) -> str:
        key = normalise(ex.text)
        if ex.source in CONTEXT_FILES:
            return groups.get(key, key)
        return key

    strata: dict[str, str] = {}
    for ex in chosen:
        strata.setdefault(group(ex), f"{ex.policy_id}|{ex.source.split(':')[0]}|{ex.label}")
    keys = sorted(strata)
    labels = [strata[t] for t in keys]
    counts = Counter(labels)
    labels = [s if counts[s] >= 2 else "rare" for s in labels]
    if labels.count("rare") == 1:  # one lone stratum cannot be stratified: it joins the largest
        labels = [counts.most_common(1)[0][0] if s == "rare" else s for s in labels]
    _train_keys, val_keys = train_test_split(keys, test_size=val_fraction, random_state=seed, stratify=labels)
    val_set = set(val_keys)
    train = [ex for ex in chosen if group(ex) not in val_set]
    validation = [ex for ex in chosen if group(ex) in val_set]
    train = train + [ex for ex in train for _ in range(budget.source_repeat.get(ex.source, 1) - 1)]
    train += embed_in_context(train, budget.embedded_per_policy, rng)
    train += with_binary_blobs(train, budget.blobs_per_policy, rng)
    rng.shuffle(train)
    heldout = heldout_rows(eval_public, policies, seed)
    stats = {
        "duplicates_removed": dropped_dupes,
        "near_duplicates_of_heldout_removed": near_dupes,
        "public_rows": len(public),
        "handwritten_rows": len(handwritten),
        "evaluation_only_sources": sorted({ex.source for ex in heldout}),
        "heldout_rows": len(heldout),
    }
    return Dataset(train=train, validation=validation, stats=stats, heldout=heldout)
