"""``make uniguard``: the paper's pipeline on the shipped data, ending where the service loads.

data (the split ``make model`` uses) → TaskGuard-FFT per policy (plain prompts) → GIP
(λ1·MLM + λ2·ALICE + λ3·CE on instruction inputs, every policy) → an FFT of the GIP checkpoint
per policy → **one joint merge search** over every policy, rewarded by the out-of-source
summary of the held-out *tune* half (``OutOfSourceSet``) → the one release step (int8,
calibration, thresholds bounded on held-out benign sources, card with the out-of-source table)
→ promotion over ``models/default`` only if the merge beats the best single checkpoint on the
held-out *test* half and the current default's summary there.

One multi-policy instruction model, not one model per policy: the service batches one model,
and a per-policy UniGuard would multiply its memory and its batches by five. The comparison
per policy (best single vs merged, test half) is written to ``runs/uniguard/comparison.md``
and the card, so the choice stays measurable.

Every stage resumes from ``runs/uniguard`` (finished checkpoints are skipped, the trial log
is replayed), and ``stages.json`` records each stage's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.policy import Policy, load_policies
from service.model.manifest import read_manifest, sha256_file
from training.data.heldout import half_of
from training.data.rows import Example, summary_rows
from training.eval.heldout import HEADER, HeldoutResult, capped_heldout, cells_table, heldout_result
from training.eval.robustness import ZERO_SHOT_HEADER, zero_rows, zero_shot_of
from training.io import write_json_atomic, write_text_atomic
from training.merging.checkpoints import load_state, resolve_sources
from training.merging.params import MergeParams
from training.merging.subsets import load_subsets
from training.model.head import HeadConfig
from training.model.loop import LoopConfig
from training.paths import base_model_path
from training.release.finalize import ReleaseOptions, heldout_of_folder
from training.release.promote import promote
from training.search.objective import MergeObjective, OutOfSourceSet, ValidationSet, load_into
from training.search.run import SearchResult, SearchSettings, run_search
from training.search.winner import export_winner, winner_recipe
from training.stages.default import DEFAULT_LOOP, HELDOUT_FPR, prepare_split
from training.stages.finetune import RunContext
from training.stages.multitaskguard import gip_stage, run_mtg
from training.stages.taskguard import run_taskguard
from training.ui import Reporter, console, print_table

NAME = "uniguard-default"


@dataclass(frozen=True)
class UniGuardConfig:
    """The recipe's sizes. CPU defaults take 31 min on 2 cores (measured); a GPU run raises the row
    counts (0: every training row), epochs, iterations and lambda_mlm to 1.0 (see docs/training.md)."""

    taskguard_rows: int = 150
    gip_rows: int = 400
    finetune_rows: int = 150
    max_length: int = 128
    stride: int = 32
    batch_size: int = 16
    taskguard_lr: float = 8e-5
    gip_lr: float = 2e-4
    finetune_lr: float = 5e-5
    epochs: float = 1.0
    lambda_mlm: float = 0.1
    lambda_alice: float = 1.0
    methods: tuple[str, ...] = ("ties", "dare_ties", "soup")
    strategies: tuple[str, ...] = ("ucb",)
    subsets: tuple[str, ...] = ("all", "no_head")
    iterations: int = 6
    top_k: int = 4
    search_rows: int = 400
    search_windows: int = 2
    heldout_per_cell: int = 20
    stage_validation_rows: int = 100  # per policy, for each checkpoint's own record (the search ranks them)
    seed: int = 13
    threads: int = 0
    device: str = "cpu"
    min_parity: float | None = 0.995
    gip_only: bool = False  # train GIP and score its zero-shot rows only (seed repeats of that check)
    # checkpoint folders trained elsewhere on the same split (make model's runs/default/checkpoint),
    # searched with the recipe's own: does merging add to the strongest single model?
    extra_sources: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items() if k != "extra"}


class StageClock:
    """Wall time per stage in ``stages.json`` (a resumed stage records what this run spent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(time.time() - started, 1)
            write_json_atomic(self.path, self.seconds)


def winner_template(result: SearchResult, objective: MergeObjective) -> Any:
    key = result.winner.get("instruction")
    return objective.templates[key] if key else next(iter(objective.templates.values()))


def candidate_results(
    result: SearchResult,
    objective: MergeObjective,
    test_rows: list[Example],
    policies: dict[str, Policy],
    params: MergeParams,
) -> dict[str, HeldoutResult]:
    """Best single source and merged winner on the held-out test half (torch fp32, the search's
    window cap), each at thresholds chosen on validation + tune rows as the release chooses them."""
    val = objective.validation
    if not isinstance(val, OutOfSourceSet):
        raise TypeError("candidate_results needs the out-of-source objective")
    test = ValidationSet(test_rows, policies, val.tokenizer_json, val.max_length, val.stride, val.max_windows)
    single = result.best_single[0]
    src = next(s for s in result.sources if s.name == single)
    out: dict[str, HeldoutResult] = {}
    for label, template, load in (
        (f"best single ({single})", src.template, lambda: load_into(objective.model, load_state(src.path))),
        ("merged", winner_template(result, objective), None),
    ):
        if load is None:
            recipe = winner_recipe(result, params)
            objective.use_method(recipe.method, params)
            load_into(objective.model, objective.merger.merge(recipe.weights, objective.subsets[recipe.subset]))  # type: ignore[union-attr]
        else:
            load()
        thresholds = val.thresholds(val.score(objective.model, template))
        out[label] = heldout_result(test_rows, test.score(objective.model, template), thresholds)
    return out


def gip_zero_shot(run_dir: Path, threads: int) -> list[dict[str, Any]]:
    """The run's GIP checkpoint on the zero-shot rows, printed: both paths of the recipe report it."""
    zero = zero_shot_of(run_dir / "mtg" / "gip", threads)
    print_table("GIP zero-shot (policies no stage trained on, threshold 0.5)", ZERO_SHOT_HEADER, zero_rows(zero))
    return zero


def recorded_heldout(folder: Path) -> HeldoutResult | None:
    """The out-of-source figures a folder's release step recorded in its manifest (the same test
    rows when the folder was released from this split), without scoring it again."""
    held = read_manifest(folder).training.get("heldout")
    if not isinstance(held, dict) or not isinstance(held.get("summary"), float):
        return None
    return HeldoutResult({}, held["cells"], float(held["summary"]), held["sources"], held["rows"])


def comparison_table(results: dict[str, HeldoutResult]) -> str:
    """Per policy: each candidate's out-of-source F1 (where a source has both classes), worst
    benign FPR and mean cell accuracy; then the summary row."""
    names = list(results)
    lines = [
        "| policy | " + " | ".join(f"{n}: F1 / worst FPR % / cells" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    policies = sorted({c["policy"] for r in results.values() for c in r.cells})
    for pid in policies:
        row = []
        for n in names:
            cells = [c for c in results[n].cells if c["policy"] == pid]
            f1s = [c["f1"] for c in cells if c.get("f1") is not None]
            fprs = [c["fpr"] for c in cells if c["label"] == 0]
            accs = [c["recall"] if c["label"] else 1.0 - c["fpr"] for c in cells]
            f1 = f"{np.mean(f1s):.3f}" if f1s else "–"
            fpr = f"{100 * max(fprs):.1f}" if fprs else "–"
            row.append(f"{f1} / {fpr} / {np.mean(accs):.3f}")
        lines.append(f"| {pid} | " + " | ".join(row) + " |")
    lines.append("| **summary** | " + " | ".join(f"**{results[n].summary:.4f}**" for n in names) + " |")
    return "\n".join(lines) + "\n"


def build_uniguard(
    data_dir: Path,
    examples_dir: Path,
    policies_dir: Path,
    out_dir: Path,
    run_dir: Path,
    cfg: UniGuardConfig = UniGuardConfig(),
    *,
    force: bool = False,
    creation_command: str = "make uniguard",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) the recipe; returns its summary (also ``run_dir/summary.json``)."""
    reporter = reporter or Reporter()
    started = time.time()
    if cfg.extra_sources:  # a wrong folder fails now, not after the training stages
        resolve_sources([Path(p) for p in cfg.extra_sources])
    clock = StageClock(run_dir / "stages.json")
    policies = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl"))
    base = base_model_path()
    with clock.stage("data"):
        # make model's split whatever the training seed: seeds vary training, never the data.
        split = prepare_split(data_dir, example_files, set(policies), run_dir, DEFAULT_LOOP.seed)
    train, validation, heldout = split["train"], split["validation"], split["heldout"]
    if not heldout:
        raise ValueError("the recipe needs held-out rows: the out-of-source protocol rewards and promotes")
    print_table("Rows per policy and split", ["policy", "split", "rows", "unsafe fraction"], summary_rows(split))
    hashes = {p.name: sha256_file(p) for p in sorted(Path(data_dir).glob("*.jsonl")) + example_files}
    ids = sorted(policies)
    head = HeadConfig(seed=cfg.seed, device=cfg.device, threads=cfg.threads)

    def loop(lr: float, **extra: Any) -> LoopConfig:
        return LoopConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=lr,
            seed=cfg.seed,
            device=cfg.device,
            threads=cfg.threads,
            save_every=50,
            **extra,
        )

    common = {
        "max_length": cfg.max_length,
        "stride": cfg.stride,
        "data_hashes": hashes,
        "reporter": reporter,
        "max_validation": cfg.stage_validation_rows,
    }
    gip_loop = loop(cfg.gip_lr, lambda_mlm=cfg.lambda_mlm, lambda_alice=cfg.lambda_alice)
    if cfg.gip_only:  # the zero-shot check across seeds: GIP and its zero-shot rows, nothing else
        with clock.stage("gip"):
            ctx = RunContext(run_dir, policies, cfg.max_length, cfg.stride, hashes, reporter, False,
                             cfg.stage_validation_rows)  # fmt: skip
            gip_stage(base, ctx, train, validation, holdout=None, max_train_per_policy=cfg.gip_rows, loop=gip_loop)
        out = {"gip_zero_shot": gip_zero_shot(run_dir, cfg.threads), "seed": cfg.seed, "stage_seconds": clock.seconds}
        write_json_atomic(run_dir / "summary.json", out)
        return out
    with clock.stage("taskguard-fft"):
        run_taskguard(
            run_dir, base, policies, train, validation, policy_ids=ids, modes=["fft"],
            max_train=cfg.taskguard_rows, loop=loop(cfg.taskguard_lr), head=head, **common,
        )  # fmt: skip
    with clock.stage("gip + per-policy fft"):
        run_mtg(
            run_dir, base, policies, train, validation, holdout=None, policy_ids=ids, finetune_modes=["fft"],
            gip_max_train=cfg.gip_rows, ft_max_train=cfg.finetune_rows,
            gip_loop=gip_loop, ft_loop=loop(cfg.finetune_lr), head=head, **common,
        )  # fmt: skip
    gip_zero = gip_zero_shot(run_dir, cfg.threads)
    settings = SearchSettings(
        methods=list(cfg.methods),
        strategies=list(cfg.strategies),
        subsets=list(cfg.subsets),
        iterations=cfg.iterations,
        top_k=cfg.top_k,
        params=MergeParams(seed=cfg.seed),
        seed=cfg.seed,
        max_rows=cfg.search_rows,
        max_windows=cfg.search_windows,
        max_length=cfg.max_length,
        stride=cfg.stride,
        threads=cfg.threads,
        heldout_per_cell=cfg.heldout_per_cell,
    )
    merge_dir = run_dir / "merge"
    with clock.stage("merge search"):
        result, objective, _ = run_search(
            resolve_sources([run_dir / "checkpoints.json", *map(Path, cfg.extra_sources)]),
            run_dir / "validation.jsonl",
            policies_dir,
            settings,
            merge_dir / "trials.jsonl",
            load_subsets(None),
            fallback_base=base,
            progress=lambda desc, done, total, info: (
                reporter.print(f"{desc}: {done}/{total} {info}") if done == total else None
            ),
            heldout=heldout,
        )
    with clock.stage("test-half comparison"):
        test_rows = capped_heldout([ex for ex in heldout if half_of(ex.text) == "test"], cfg.heldout_per_cell)
        compared = candidate_results(result, objective, test_rows, policies, settings.params)
        table = comparison_table(compared)
        write_text_atomic(run_dir / "comparison.md", table)
        console.print(table)
    single_label, merged = next(iter(compared)), compared["merged"]
    beats_single = merged.summary > compared[single_label].summary
    release_dir = merge_dir / "release"
    with clock.stage("release"), reporter.task("release: export, score validation (service loader)") as update:
        summary = export_winner(
            result,
            objective,
            params=settings.params,
            validation_rows=validation,
            policies=policies,
            run_dir=merge_dir,
            out_dir=release_dir,
            name=NAME,
            creation_command=creation_command,
            trial_log=merge_dir / "trials.jsonl",
            started=started,
            options=ReleaseOptions(HELDOUT_FPR, threads=cfg.threads, min_parity=cfg.min_parity),
            heldout=heldout,
            extra_training={
                "recipe_config": cfg.as_dict(),
                "stage_seconds": clock.seconds,
                "test_half_comparison": {k: round(v.summary, 4) for k, v in compared.items()},
                "beats_best_single_test_half": beats_single,
                "gip_zero_shot": gip_zero,
            },
            card_extra="\n## Merged vs best single checkpoint (held-out test half, torch fp32, capped rows)\n\n"
            "Per policy: mean F1 over held-out sources with both classes / worst benign FPR % / mean cell "
            "accuracy (recall or 1 - FPR), at thresholds chosen on validation + tune rows.\n\n" + table,
            progress=lambda done, total: update(done, total, ""),
        )
    with clock.stage("promotion"):
        if not beats_single and not force:
            done, why = False, f"the merge does not beat {single_label} on the held-out test half"
        else:

            def summary_of(folder: Path) -> float | None:
                r = recorded_heldout(folder) if folder == release_dir else None  # scored on these rows
                r = r or heldout_of_folder(folder, heldout, policies, cfg.threads)
                if r is not None:
                    m = read_manifest(folder)
                    served[f"{m.name}@{m.version} ({folder.name})"] = r
                return None if r is None else r.summary

            served: dict[str, HeldoutResult] = {}
            done, why = promote(release_dir, out_dir, force=force, score=summary_of)
            if len(served) == 2:  # the served merge against the default it had to beat, same rows
                promotion_table = comparison_table(served)
                write_text_atomic(run_dir / "promotion.md", promotion_table)
                console.print(promotion_table)
    console.print(("[green]promoted: " if done else "[yellow]kept the current default: ") + why)
    out = {
        **summary,
        "promoted": done,
        "why": why,
        "stage_seconds": clock.seconds,
        "minutes": round((time.time() - started) / 60, 1),
    }
    write_json_atomic(run_dir / "summary.json", out)
    if (release_dir / "manifest.json").exists():
        held = read_manifest(release_dir).training.get("heldout")
        if isinstance(held, dict):
            print_table("Merged: out of source (held-out test half, served file)", HEADER, cells_table(held))
    return out
