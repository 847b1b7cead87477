"""Model merging search (MMS), end to end: rank the sources, search each method × strategy, keep the best.

For every merge method and every search strategy the search runs ``iterations`` trials on
the same top-k sources and the same validation rows, so the final table compares like with
like (F1 at iteration 1 vs best after N, as the UniGuard paper's ablation). Each trial is
appended to the trial log as soon as it is scored; rerunning the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.contract.policy import InputTemplate, Policy, load_policies
from service.model.manifest import sha256_file
from training.data.heldout import half_of
from training.data.rows import Example, read_examples
from training.eval.heldout import capped_heldout
from training.merging.checkpoints import CheckpointSource, common_base, load_base_state, load_source_model, load_state
from training.merging.params import MergeParams
from training.merging.registry import get_method, method_names
from training.merging.subsets import ParameterSubset
from training.search.bandit import STRATEGIES, make_strategy
from training.search.log import TrialLog
from training.search.objective import MergeObjective, OutOfSourceSet, ValidationSet, evaluate_state
from training.search.space import Proposal, SearchSpace

MAX_TOP_K = 6
Progress = Callable[[str, int, int, str], None]


class SearchSettings(BaseModel):
    """What the user chose; validated here so a typo fails before minutes of model loading."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=lambda: ["soup", "ties", "dare_linear", "dare_ties", "slerp"])
    strategies: list[str] = Field(default_factory=lambda: ["random", "egreedy", "ucb", "thompson"])
    subsets: list[str] = Field(default_factory=lambda: ["all", "attention", "attention_output", "no_head"])
    iterations: int = Field(50, ge=1, le=10_000)
    top_k: int = Field(MAX_TOP_K, ge=1, le=MAX_TOP_K)
    params: MergeParams = Field(default_factory=MergeParams)
    seed: int = 13
    reward: str = Field("rank", pattern="^(rank|raw)$")
    policies: list[str] = Field(
        default_factory=list, description="Policy ids to keep from the validation file (all when empty)."
    )
    max_rows: int = Field(0, ge=0, description="Stratified subsample of validation rows for the search (0: all).")
    max_windows: int = Field(0, ge=0, description="Windows scored per row in the search (0: all, as the service does).")
    max_length: int | None = Field(
        None, gt=16, description="Window; None: what the sources were trained with (else 128)."
    )
    stride: int | None = Field(None, ge=0)
    threads: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    heldout_per_cell: int = Field(
        40, ge=1, description="Held-out tune rows per policy x source x class scored by the out-of-source reward."
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in method_names()]
        if unknown or not v:
            raise ValueError(f"unknown merge methods {unknown}; known: {method_names()}")
        return v

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STRATEGIES]
        if unknown or not v:
            raise ValueError(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
        return v


@dataclass
class SearchResult:
    sources: list[CheckpointSource]  # every candidate, ranked by validation F1
    singles: dict[str, dict[str, Any]]  # name -> scored record
    top: list[CheckpointSource]  # the top-k that were merged (top[0] is the host)
    templates: dict[str, InputTemplate]  # instruction key -> template
    trials: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    base: Path | None = None  # θ_base actually used
    max_length: int = 128
    stride: int = 32

    @property
    def best_single(self) -> tuple[str, float]:
        name = self.sources[0].name
        return name, float(self.singles[name]["f1"])

    @property
    def winner(self) -> dict[str, Any]:
        """The best trial of the whole search (earliest wins a tie)."""
        flat = [t for runs in self.trials.values() for t in runs]
        if not flat:
            raise ValueError("no trials")
        return max(flat, key=lambda t: (t["f1"], -t["order"]))


def stratified_subsample(rows: list[Example], max_rows: int, seed: int) -> list[Example]:
    """At most ``max_rows`` rows keeping each (policy, label) group's share; deterministic."""
    if not max_rows or len(rows) <= max_rows:
        return rows
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, ex in enumerate(rows):
        groups[(ex.policy_id, ex.label)].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        keep.extend(idx[: max(1, round(len(idx) * max_rows / len(rows)))])
    return [rows[i] for i in sorted(keep)]


def load_validation(path: Path, policies_dir: Path, policy_ids: list[str]) -> tuple[list[Example], dict[str, Policy]]:
    policies = load_policies(policies_dir)
    unknown = sorted(set(policy_ids) - set(policies))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(policies)}")
    rows = read_examples(Path(path), set(policies))
    if policy_ids:
        rows = [ex for ex in rows if ex.policy_id in set(policy_ids)]
    if not rows:
        raise ValueError(f"{path}: no validation rows for policies {policy_ids or sorted(policies)}")
    return rows, policies


def tokenizer_vocab_hash(folder: Path) -> str:
    """Hash of the tokenizer's model (vocabulary), ignoring padding/truncation settings."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(data.get("model"), sort_keys=True).encode()).hexdigest()


def search_meta(
    sources: list[CheckpointSource],
    validation_path: Path,
    rows: list[Example],
    settings: SearchSettings,
    base: Path | None,
    subsets: dict[str, ParameterSubset],
    tune: list[Example] | None = None,
) -> dict[str, Any]:
    """What makes two searches comparable; a resumed log must match it exactly."""
    return {
        "objective": "validation F1"
        if tune is None
        else {
            "name": "out-of-source summary (held-out tune half)",
            "rows": len(tune),
            "sha256": hashlib.sha256("\n".join(sorted(ex.text for ex in tune)).encode()).hexdigest(),
            "per_cell": settings.heldout_per_cell,
        },
        "sources": [{"name": s.name, "path": str(Path(s.path).resolve())} for s in sources],
        "validation": {
            "path": str(Path(validation_path).resolve()),
            "sha256": sha256_file(validation_path),
            "rows": len(rows),
        },
        "policies": sorted({ex.policy_id for ex in rows}),
        "base": "auto" if base is None else str(base),
        "params": settings.params.model_dump(),
        "subsets": {n: subsets[n].model_dump(include={"include", "exclude"}) for n in settings.subsets},
        "seed": settings.seed,
        "reward": settings.reward,
        "top_k": settings.top_k,
        "max_rows": settings.max_rows,
        "max_windows": settings.max_windows,
        "max_length": settings.max_length,
        "stride": settings.stride,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def window_of(sources: list[CheckpointSource], settings: SearchSettings) -> tuple[int, int]:
    """The window the sources were trained with (most common), unless the user set one."""

    def common(values: list[int | None], default: int) -> int:
        seen = [v for v in values if v is not None]
        return max(set(seen), key=seen.count) if seen else default

    return (
        settings.max_length or common([s.max_length for s in sources], 128),
        settings.stride if settings.stride is not None else common([s.stride for s in sources], 32),
    )


def run_search(
    sources: list[CheckpointSource],
    validation_path: Path,
    policies_dir: Path,
    settings: SearchSettings,
    log_path: Path,
    subsets: dict[str, ParameterSubset],
    base: Path | None = None,
    fallback_base: Path | None = None,
    progress: Progress | None = None,
    heldout: list[Example] | None = None,
) -> tuple[SearchResult, MergeObjective, ValidationSet]:
    """Run (or resume) the whole search; returns the result and the live objective for export.

    ``base`` None: θ_base is the nearest checkpoint all top-k sources descend from (GIP for
    MultiTaskGuard fine-tunes), else ``fallback_base`` (the pretrained encoder).
    ``heldout``: rows of evaluation-only sources; with them every source and trial is scored
    by the out-of-source summary of their tune half (``OutOfSourceSet``), not validation F1.
    """
    note = progress or (lambda *a: None)
    missing = [n for n in settings.subsets if n not in subsets]
    if missing:
        raise ValueError(f"unknown subsets {missing}; known: {sorted(subsets)}")
    needs_base = any(get_method(m).uses_base for m in settings.methods)
    rows, policies = load_validation(validation_path, policies_dir, settings.policies)
    ids = set(settings.policies)
    sources = [s for s in sources if s.covers(ids)]
    if not sources:
        raise ValueError(f"no checkpoint covers policies {sorted(ids)}")
    vocab = {s.name: tokenizer_vocab_hash(s.path) for s in sources}
    if len(set(vocab.values())) > 1:
        raise ValueError(f"sources use different tokenizer vocabularies and cannot be merged: {vocab}")
    rows = stratified_subsample(rows, settings.max_rows, settings.seed)
    max_length, stride = window_of(sources, settings)
    settings = settings.model_copy(update={"max_length": max_length, "stride": stride})
    tune = None
    if heldout is not None:
        wanted = {ex.policy_id for ex in rows}
        tune = capped_heldout(
            [ex for ex in heldout if ex.policy_id in wanted and half_of(ex.text) == "tune"], settings.heldout_per_cell
        )
    log = TrialLog(log_path)
    log.open(search_meta(sources, validation_path, rows, settings, base, subsets, tune))
    tokenizer = sources[0].path / "tokenizer.json"
    validation = (
        ValidationSet(rows, policies, tokenizer, max_length, stride, settings.max_windows)
        if tune is None
        else OutOfSourceSet(
            rows + tune, policies, tokenizer, max_length, stride, settings.max_windows, n_validation=len(rows)
        )
    )

    # 1. every source alone: the baselines, and the ranking that picks the top-k.
    singles = {r["source"]: r for r in log.of_kind("single")}
    model = load_source_model(sources[0].path)
    todo = [s for s in sources if s.name not in singles]
    for i, src in enumerate(todo):
        note("score sources", i, len(todo), src.name)
        scored = evaluate_state(model, load_state(src.path), validation, src.template, settings.batch_size)
        record = {
            "kind": "single",
            "source": src.name,
            "family": src.family,
            "policy": src.policy,
            "reported_f1": src.reported_f1,
            **scored.to_json(),
        }
        log.append(record)
        singles[src.name] = record
        note("score sources", i + 1, len(todo), f"{src.name} F1 {scored.f1:.4f}")
    ranked = sorted(sources, key=lambda s: (-singles[s.name]["f1"], s.name))
    top = ranked[: settings.top_k]

    # 2. the space: weights over the top-k, type = subset, instruction when the top-k disagree.
    templates: dict[str, InputTemplate] = {}
    for s in top:
        t = s.template
        if t not in templates.values():
            templates[str(len(templates))] = t
    categories: dict[str, tuple[str, ...]] = {"type": tuple(settings.subsets)}
    if len(templates) > 1:
        categories["instruction"] = tuple(templates)
    space = SearchSpace(len(top), categories)
    if needs_base and base is None:
        base = common_base(top) or fallback_base
        if base is None:
            raise ValueError("the sources do not record a common starting point: pass θ_base with --base")
    space_record = {
        "kind": "space",
        "models": [s.name for s in top],
        "categories": {k: list(v) for k, v in categories.items()},
        "templates": {k: t.model_dump() for k, t in templates.items()},
        "base": None if base is None else str(base),
    }
    logged_space = log.of_kind("space")
    if not logged_space:
        log.append(space_record)
    elif logged_space[-1] != space_record:
        raise ValueError(f"{log_path}: the logged search space differs from this run's; use another log")

    # 3. every method x strategy, resumed from the log.
    states = [load_state(s.path) for s in top]
    base_state = load_base_state(base) if needs_base and base is not None else None
    result_base = base
    objective = MergeObjective(
        states,
        validation,
        model,
        subsets,
        templates,
        base=base_state,
        threads=settings.threads,
        batch_size=settings.batch_size,
    )
    done = log.trials()
    order = len(log.of_kind("trial"))
    for method in settings.methods:
        objective.use_method(method, settings.params)
        for strategy_name in settings.strategies:
            strategy = make_strategy(strategy_name, space, seed=settings.seed, reward=settings.reward)
            history = done.get((method, strategy_name), [])
            for trial in history:
                strategy.observe(Proposal.from_json(trial), trial["f1"])
            for it in range(len(history), settings.iterations):
                note(
                    f"{method} × {strategy_name}",
                    it,
                    settings.iterations,
                    f"best {strategy.best[1]:.4f}" if strategy.best else "",
                )
                proposal = strategy.propose(it)
                scored = objective.evaluate(proposal)
                strategy.observe(proposal, scored.f1)
                record = {
                    "kind": "trial",
                    "method": method,
                    "strategy": strategy_name,
                    "iteration": it,
                    "order": order,
                    **proposal.to_json(),
                    "type": proposal.choices.get("type"),
                    "instruction": proposal.choices.get("instruction"),
                    **scored.to_json(),
                }
                log.append(record)
                order += 1
            note(
                f"{method} × {strategy_name}",
                settings.iterations,
                settings.iterations,
                f"best {strategy.best[1]:.4f}" if strategy.best else "",
            )
    objective.merger = None  # release the last method's cached task vectors
    wanted = {(m, s) for m in settings.methods for s in settings.strategies}
    # A log may hold more iterations than asked for now: the table reports the N asked for.
    trials = {k: [t for t in v if t["iteration"] < settings.iterations] for k, v in log.trials().items() if k in wanted}
    result = SearchResult(
        sources=ranked,
        singles=singles,
        top=top,
        templates=templates,
        trials=trials,
        base=result_base,
        max_length=max_length,
        stride=stride,
    )
    return result, objective, validation
