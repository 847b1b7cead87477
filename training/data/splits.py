"""Dataset stage of the UniGuard pipeline: per-policy train / validation / test splits.

The split reuses ``training.data.build.build_dataset`` (public mapping, cross-file dedupe before
any split, per-source caps, lent benign and cross-policy rows, group-safe stratified split)
and carves its held-out part once more into validation and test, again by normalised
text, so a text and its near-copies never sit on two sides. Validation is for model
selection (and the merging stage's top-k); test stays untouched until the end.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import train_test_split

from service.model.manifest import sha256_file
from training.data.build import Budget, build_dataset
from training.data.rows import Example, normalise, read_examples, summary_rows, write_examples
from training.io import staged_dir, write_json_atomic

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    stats: dict[str, object] = field(default_factory=dict)

    def by_name(self, name: str) -> list[Example]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def named(self) -> dict[str, list[Example]]:
        return {name: self.by_name(name) for name in SPLITS}


def _safe_strata(keys: list[str]) -> list[str]:
    """Strata usable by sklearn's stratified split: classes of one row are pooled as 'rare'."""
    counts = Counter(keys)
    out = [k if counts[k] >= 2 else "rare" for k in keys]
    if Counter(out)["rare"] == 1:  # a lone rare row joins the largest stratum
        biggest = Counter(out).most_common(1)[0][0]
        out = [biggest if k == "rare" else k for k in out]
    return out


def split_by_text(rows: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split rows into (rest, held) with ``fraction`` of texts held; every copy of a text on one side."""
    strata: dict[str, str] = {}
    for ex in rows:
        strata.setdefault(normalise(ex.text), f"{ex.policy_id}|{ex.source.split(':')[0]}|{ex.label}")
    texts = sorted(strata)
    if len(texts) < 2:
        return list(rows), []
    keys = _safe_strata([strata[t] for t in texts])
    try:
        _, held = train_test_split(texts, test_size=fraction, random_state=seed, stratify=keys)
    except ValueError:  # too few rows per stratum for the requested fraction (tiny inputs)
        _, held = train_test_split(texts, test_size=fraction, random_state=seed)
    held_set = set(held)
    return [ex for ex in rows if normalise(ex.text) not in held_set], [
        ex for ex in rows if normalise(ex.text) in held_set
    ]


def build_splits(
    data_dir: Path,
    example_files: list[Path],
    policies: set[str],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 13,
    budget: Budget | None = None,
) -> Splits:
    """Train / validation / test rows for every policy (dedupe happens before any split)."""
    held_fraction = val_fraction + test_fraction
    if not 0 < held_fraction < 1:
        raise ValueError(f"validation + test fractions must be in (0, 1), got {held_fraction}")
    ds = build_dataset(data_dir, example_files, policies, val_fraction=held_fraction, seed=seed, budget=budget)
    validation, test = split_by_text(ds.validation, test_fraction / held_fraction, seed + 1)
    return Splits(ds.train, validation, test, dict(ds.stats))


def add_train_only(splits: Splits, files: list[Path], policies: set[str]) -> dict[str, dict[str, int]]:
    """Generated rows join the training split only, after the split is drawn.

    Validation and test then stay the same real (public + hand-written) rows with or without
    the generated data, which is what makes a with/without comparison fair, and a model is
    never selected on its generator's own text. A generated text already held out is dropped
    (it would leak), as is one already in train for the same policy.
    """
    held = {normalise(ex.text) for ex in splits.validation + splits.test}
    trained = {(ex.policy_id, normalise(ex.text)) for ex in splits.train}
    counts: dict[str, dict[str, int]] = {}
    for path in files:
        c = counts.setdefault(Path(path).name, {"rows": 0, "added": 0, "held_out_text": 0, "duplicate": 0})
        for ex in read_examples(Path(path), policies):
            c["rows"] += 1
            key = normalise(ex.text)
            if key in held:
                c["held_out_text"] += 1
            elif (ex.policy_id, key) in trained:
                c["duplicate"] += 1
            else:
                trained.add((ex.policy_id, key))
                splits.train.append(ex)
                c["added"] += 1
    splits.stats["train_only"] = counts
    return counts


def save_splits(splits: Splits, data_dir: Path, config: dict, input_hashes: dict[str, str]) -> dict:
    """Write ``data_dir`` (three JSONL files + stats.json) atomically; returns the stats written."""
    with staged_dir(data_dir) as tmp:
        for name in SPLITS:
            write_examples(tmp / f"{name}.jsonl", splits.by_name(name))
        stats = {
            "config": config,
            "input_hashes": input_hashes,
            "split_hashes": {f"{n}.jsonl": sha256_file(tmp / f"{n}.jsonl") for n in SPLITS},
            "rows": [
                {"policy": p, "split": s, "rows": n, "unsafe_fraction": round(f, 4)}
                for p, s, n, f in summary_rows(splits.named())
            ],
            **splits.stats,
        }
        write_json_atomic(tmp / "stats.json", stats)
    return stats


def load_splits(data_dir: Path) -> Splits:
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))
    train, validation, test = (read_examples(data_dir / f"{n}.jsonl") for n in SPLITS)
    return Splits(train, validation, test, stats=stats)


def split_hashes(data_dir: Path) -> dict[str, str]:
    """Hashes of the split files a checkpoint was trained and selected on (stored in its metadata)."""
    return json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))["split_hashes"]


def for_policy(rows: list[Example], policy_id: str) -> list[Example]:
    return [ex for ex in rows if ex.policy_id == policy_id]


def without_policy(rows: list[Example], policy_id: str) -> list[Example]:
    """Rows with no trace of a held-out policy: its own rows and its unsafe texts lent to others."""
    return [ex for ex in rows if ex.policy_id != policy_id and ex.source != f"cross:{policy_id}"]


def subsample(rows: list[Example], per_policy: int | None, seed: int) -> list[Example]:
    """At most ``per_policy`` rows per policy, unsafe fraction kept (CPU-sized training sets).

    Sampling is per (policy, label) so a small policy keeps its balance; 0/None keeps all.
    """
    if not per_policy:
        return list(rows)
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in rows:
        groups[ex.policy_id].append(ex)
    out: list[Example] = []
    for pid in sorted(groups):
        group = groups[pid]
        if len(group) <= per_policy:
            out.extend(group)
            continue
        by_label: dict[int, list[Example]] = defaultdict(list)
        for ex in group:
            by_label[ex.label].append(ex)
        for _label, members in sorted(by_label.items()):
            k = max(1, round(per_policy * len(members) / len(group)))
            members = sorted(members, key=lambda e: (e.text, e.source))
            rng.shuffle(members)
            out.extend(members[:k])
    rng.shuffle(out)
    return out
