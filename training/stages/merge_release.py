"""The recipe's tail: one merge search over its sources, the test-half comparison, the one release
step, and promotion over the served folder only if the merge wins.

The search (``training.search.run``: every method × bandit strategy × parameter subset) is
rewarded by the out-of-source summary on the held-out *tune* half at the ``balanced``
thresholds. The comparison (``training.stages.compare``) scores the reference (the base the
sources were continued from, else the best single source), every merged source and the merge on
the *test* half. The merge is released like every model folder (int8, calibration, sensitivity
levels, card) and promoted only if it beats the reference there with no policy worse beyond the
noise of its cells, and then beats the served folder on the released figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contract.policy import InputTemplate, Policy
from service.model.manifest import read_manifest
from training.data.rows import Example
from training.eval.heldout import HEADER, HeldoutResult, cells_table
from training.io import write_json_atomic, write_text_atomic
from training.merging.checkpoints import CheckpointSource, load_state, resolve_sources
from training.merging.params import MergeParams
from training.merging.subsets import load_subsets
from training.release.finalize import DEFAULT_OPTIONS, ReleaseOptions, heldout_of_folder
from training.release.promote import promote
from training.search.objective import MergeObjective, OutOfSourceSet, load_into
from training.search.run import SearchResult, SearchSettings, run_search
from training.search.winner import export_winner, winner_recipe
from training.stages.compare import comparison_sets, policy_comparison, score_candidates, worse_policies
from training.ui import Reporter, console, print_table

NAME = "uniguard-default"
CARD_INTRO = (
    "\n## Per policy at `balanced`: reference, every source, merged (held-out test half, torch fp32)\n\n"
    "Thresholds chosen on validation + tune rows by the protocol's balanced rule; binding sources only, "
    "rows per cell and windows per row capped (the served file's figures above are the release step's). "
    "± 2 s.e.: binomial noise of the policy's cells.\n\n"
)


@dataclass(frozen=True)
class MergePlan:
    """What the tail needs besides the data: where, what to search, what to compare against."""

    sources: list[Path]  # checkpoint folders and checkpoints indexes
    policies_dir: Path
    run_dir: Path  # the split (validation.jsonl) and stages.json
    merge_dir: Path  # the search log, the winner, its release and the records
    out_dir: Path  # the served folder the merge may replace
    settings: SearchSettings
    base: Path | None  # θ_base and the comparison's reference; None: the sources' common start, else fallback
    fallback_base: Path | None
    compare_per_cell: int = 60
    compare_windows: int = 4
    release: ReleaseOptions = DEFAULT_OPTIONS
    creation_command: str = "make uniguard"
    force: bool = False
    tag: str = ""  # appended to the stage names in stages.json (one budget of several)


def winner_template(result: SearchResult, objective: MergeObjective) -> InputTemplate:
    key = result.winner.get("instruction")
    return objective.templates[key] if key else next(iter(objective.templates.values()))


def candidates_of(
    result: SearchResult, objective: MergeObjective, base: Path | None, params: MergeParams
) -> tuple[dict[str, tuple[InputTemplate, Any]], str]:
    """Label → (template, loader) for the reference, every merged source and the merge; and the reference's label."""
    model = objective.model

    def source_loader(src: CheckpointSource) -> Any:
        return lambda: load_into(model, load_state(src.path))

    def merged() -> None:
        recipe = winner_recipe(result, params)
        objective.use_method(recipe.method, params)
        assert objective.merger is not None
        load_into(model, objective.merger.merge(recipe.weights, objective.subsets[recipe.subset]))
        objective.merger = None

    out: dict[str, tuple[InputTemplate, Any]] = {}
    ref = f"best single ({result.best_single[0]})"
    top = list(result.top)
    if base is not None:
        known = next((s for s in result.sources if s.path.resolve() == Path(base).resolve()), None)
        template = known.template if known else top[0].template
        ref = "base"
        out[ref] = (template, lambda: load_into(model, load_state(Path(base))))
        top = [s for s in top if s is not known]
    else:
        best = result.sources[0]
        out[ref] = (best.template, source_loader(best))
        top = [s for s in top if s is not best]
    for src in top:
        out[src.name] = (src.template, source_loader(src))
    out["merged"] = (winner_template(result, objective), merged)
    return out, ref


def search_release_promote(
    plan: MergePlan,
    validation: list[Example],
    heldout: list[Example],
    policies: dict[str, Policy],
    clock: Any,
    reporter: Reporter,
    extra_training: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Search, compare, release and (maybe) promote; returns the summary (also ``summary.json`` there)."""
    run_dir, merge_dir, settings, tag = plan.run_dir, plan.merge_dir, plan.settings, plan.tag

    def note(desc: str, done: int, total: int, info: str) -> None:
        if done == total:
            reporter.print(f"{desc}: {done}/{total} {info}")

    with clock.stage(f"merge search{tag}"):
        result, objective, search_set = run_search(
            resolve_sources(plan.sources), run_dir / "validation.jsonl", plan.policies_dir, settings,
            merge_dir / "trials.jsonl", load_subsets(None), base=plan.base,
            fallback_base=plan.fallback_base, heldout=heldout,
            progress=note,
        )  # fmt: skip
    if not isinstance(search_set, OutOfSourceSet):
        raise TypeError("the recipe searches with the out-of-source reward")
    with clock.stage(f"test-half comparison{tag}"):
        tune, test = comparison_sets(search_set, heldout, plan.compare_per_cell, plan.compare_windows)
        candidates, ref = candidates_of(result, objective, plan.base, settings.params)
        compared = score_candidates(candidates, objective.model, tune, test, progress=reporter.print)
        table = policy_comparison(compared, base=ref)
        write_text_atomic(merge_dir / "comparison.md", table)
        console.print(table)
    merged, reference = compared["merged"], compared[ref]
    worse = worse_policies(merged, reference)
    wins = merged.summary > reference.summary and not worse
    release_dir = merge_dir / "release"
    training = {
        **extra_training,
        "stage_seconds": clock.seconds,
        "test_half_reference": ref,
        "test_half_comparison": {k: round(v.summary, 4) for k, v in compared.items()},
        "test_half_by_policy": {k: {p: e["balanced"] for p, e in v.policies.items()} for k, v in compared.items()},
        "beats_reference_test_half": merged.summary > reference.summary,
        "policies_worse_beyond_noise": worse,
    }
    task = "release: export, score validation and held-out (service loader)"
    with clock.stage(f"release{tag}"), reporter.task(task) as update:
        summary = export_winner(
            result, objective, params=settings.params, validation_rows=validation, policies=policies,
            run_dir=merge_dir, out_dir=release_dir, name=NAME, creation_command=plan.creation_command,
            trial_log=merge_dir / "trials.jsonl", started=started, options=plan.release,
            heldout=heldout, extra_training=training, card_extra=CARD_INTRO + table,
            progress=lambda done, total: update(done, total, ""),
        )  # fmt: skip
    with clock.stage(f"promotion{tag}"):
        done, why = _promote(plan, release_dir, heldout, policies, wins, ref, worse)
    console.print(("[green]promoted: " if done else "[yellow]kept the served folder: ") + why)
    out = {**summary, **training, "promoted": done, "why": why, "stage_seconds": clock.seconds,
           "minutes": round((time.time() - started) / 60, 1)}  # fmt: skip
    write_json_atomic(merge_dir / "summary.json", out)
    held = read_manifest(release_dir).training.get("heldout")
    if isinstance(held, dict):
        print_table("Merged: out of source (held-out test half, served file)", HEADER, cells_table(held))
    return out


def _promote(
    plan: MergePlan,
    release_dir: Path,
    heldout: list[Example],
    policies: dict[str, Policy],
    wins: bool,
    ref: str,
    worse: dict[str, float],
) -> tuple[bool, str]:
    if not wins and not plan.force:
        if worse:
            return False, f"the merge is worse than the {ref} beyond noise on {worse} (held-out test half)"
        return False, f"the merge does not beat the {ref} on the held-out test half"
    served: dict[str, HeldoutResult] = {}

    def summary_of(folder: Path) -> float | None:
        recorded = recorded_heldout(folder) if folder == release_dir else None  # scored on these rows
        r = recorded or heldout_of_folder(folder, heldout, policies, plan.release.threads)
        if r is not None:
            served["merged (released)" if folder == release_dir else f"served ({folder.name})"] = r
        return None if r is None else r.summary

    done, why = promote(release_dir, plan.out_dir, force=plan.force, score=summary_of)
    if len(served) == 2:  # the served merge against the folder it had to beat, same rows, service loader
        base = next(k for k in served if k.startswith("served"))
        write_text_atomic(plan.merge_dir / "promotion.md", policy_comparison(served, base=base))
    return done, why


def recorded_heldout(folder: Path) -> HeldoutResult | None:
    """The out-of-source figures a folder's release step recorded in its manifest, without scoring again."""
    held = read_manifest(folder).training.get("heldout")
    if not isinstance(held, dict) or not isinstance(held.get("summary"), float):
        return None
    return HeldoutResult({}, held["cells"], float(held["summary"]), held["sources"], held["rows"], held["policies"])
