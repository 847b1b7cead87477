"""Training data for the multi-policy instruction classifier.

Public data (``../shared/data``) is mapped to policies, deduplicated across files before
any split, capped per source so that no source (long jailbreak dumps, 25k Alpaca rows)
dominates a policy, mixed with hand-written examples and with cross-policy negatives
(a prompt that breaks one policy is usually fine under another: that is what makes the
model read the instruction), then split train/validation stratified by policy, source and
label, with every copy of a text on the same side.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    policy_id: str
    source: str
    category: str | None = None
    rationale: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class ExampleRow(BaseModel):
    """One row of a JSONL training file (hand-written or synthetic)."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    label: int = Field(ge=0, le=1)
    policy_id: str
    source: str = "handwritten"
    category: str | None = None
    rationale: str | None = None


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def normalise(text: str) -> str:
    """Key for deduplication: case, accents-as-composed, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w]+", " ", text)
    return " ".join(text.split())


def read_jsonl(path: Path) -> list[dict]:
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
        out.append(Example(r.text, r.label, r.policy_id, r.source, r.category, r.rationale))
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# How public files map to policies. (file stem, policy, category filter) -> rows kept as labelled.
# Rows of a category listed in EXCLUDE are dropped for that policy; REROUTE sends them elsewhere.
PUBLIC_MAP: dict[str, str] = {
    "deepset_prompt_injections": "prompt_injection",
    "jailbreak_classification": "prompt_injection",
    "itw_jailbreak_prompts": "prompt_injection",
    "jbb_jailbreak_prompts": "prompt_injection",
    "toxic_chat_human": "toxicity",
    "refusal_direction": "content_safety",
    "harmbench": "content_safety",
    "advbench": "content_safety",
    "strongreject": "content_safety",
    "malicious_instruct": "content_safety",
    "jbb_behaviors": "content_safety",
    "forbidden_questions": "content_safety",
}
# (file stem, category) -> policy, or None to drop: categories the file's policy does not cover.
REROUTE: dict[tuple[str, str], str | None] = {
    ("toxic_chat_human", "jailbreaking"): "prompt_injection",
    ("forbidden_questions", "Financial Advice"): "financial_advice",
    # Copyright requests ("give me the lyrics of ...") are not harmful help under content_safety.
    ("harmbench", "copyright/copyright"): None,
}
# Safe rows of these files form a general benign pool, lent to every policy as safe examples.
BENIGN_POOL_FILES = ("refusal_direction", "toxic_chat_human", "deepset_prompt_injections", "jailbreak_classification")


@dataclass
class Budget:
    """Caps that keep one source from dominating a policy (rows per source and label)."""

    per_source_unsafe: dict[str, int] = field(default_factory=lambda: {
        "prompt_injection": 380, "toxicity": 1000, "content_safety": 320, "financial_advice": 1000, "tax_advice": 1000,
    })
    per_source_safe: dict[str, int] = field(default_factory=lambda: {
        "prompt_injection": 420, "toxicity": 800, "content_safety": 600, "financial_advice": 1000, "tax_advice": 1000,
    })
    benign_pool: dict[str, int] = field(default_factory=lambda: {
        "prompt_injection": 400, "toxicity": 300, "content_safety": 400, "financial_advice": 350, "tax_advice": 350,
    })
    cross_negatives: int = 160  # per (source policy -> target policy) pair
    # Few, precise rows aimed at known failure modes (hand-written near-misses, short and
    # German injections) are repeated in training, never in validation.
    source_repeat: dict[str, int] = field(default_factory=lambda: {"handwritten": 2, "deepset_prompt_injections": 2})


# Benign-pool rows that touch a policy's topic are not lent to it: "what stocks should I buy"
# sits in Alpaca as a benign instruction, yet it is exactly what financial_advice forbids.
POOL_TOPIC_EXCLUDE: dict[str, re.Pattern[str]] = {
    "financial_advice": re.compile(
        r"invest|stock|share|bond|fund|etf|crypto|bitcoin|portfolio|retire|pension|401|ira\b|mortgage|loan|"
        r"debt|saving|money|financ|wealth|trading|trade|broker|dividend|asset|budget", re.I),
    "tax_advice": re.compile(r"tax|irs|deduct|accountant|audit|vat\b|income|refund|fiscal|hmrc", re.I),
}

# Which policies' unsafe prompts are clearly safe under which others.
CROSS_NEGATIVES: dict[str, tuple[str, ...]] = {
    "financial_advice": ("prompt_injection", "toxicity", "content_safety"),
    "tax_advice": ("prompt_injection", "toxicity", "content_safety"),
    "content_safety": ("prompt_injection", "financial_advice", "tax_advice"),
    "toxicity": ("prompt_injection", "financial_advice", "tax_advice"),
    "prompt_injection": ("financial_advice", "tax_advice"),
}


# Unsafe rows of these categories also break the target policies: never lend them as safe.
CROSS_SKIP_CATEGORIES = {"evasion"}


def load_public(data_dir: Path) -> list[Example]:
    """Every row of the shared public files, mapped to its policy (before balancing)."""
    out = []
    for stem, policy in PUBLIC_MAP.items():
        path = Path(data_dir) / f"{stem}.jsonl"
        if not path.exists():
            raise DataError(f"missing public data file {path}")
        for row in read_jsonl(path):
            target = REROUTE.get((stem, row.get("category")), policy) if row.get("category") else policy
            if target is None:
                continue
            out.append(Example(row["text"], int(row["label"]), target, stem, row.get("category")))
    return out


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
    from sklearn.model_selection import train_test_split

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
    train_texts, val_texts = train_test_split(texts, test_size=val_fraction, random_state=seed, stratify=labels)
    val_set = set(val_texts)
    train = [ex for ex in chosen if normalise(ex.text) not in val_set]
    validation = [ex for ex in chosen if normalise(ex.text) in val_set]
    train = train + [ex for ex in train for _ in range(budget.source_repeat.get(ex.source, 1) - 1)]
    rng.shuffle(train)
    stats = {"duplicates_removed": dropped_dupes, "public_rows": len(public), "handwritten_rows": len(handwritten)}
    return Dataset(train=train, validation=validation, stats=stats)


def summary_rows(ds: Dataset) -> list[tuple[str, str, int, float]]:
    """(policy, split, rows, unsafe fraction) for the printed table."""
    out = []
    for split, rows in (("train", ds.train), ("validation", ds.validation)):
        by_pid: dict[str, list[int]] = defaultdict(list)
        for ex in rows:
            by_pid[ex.policy_id].append(ex.label)
        for pid in sorted(by_pid):
            labels = by_pid[pid]
            out.append((pid, split, len(labels), sum(labels) / len(labels)))
    return out
