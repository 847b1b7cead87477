"""``make uniguard``: the served model as a UniGuard merge of specialists continued from one checkpoint.

base (the multi-policy checkpoint ``make model`` trains; its split) → one specialist per policy,
the base continued on that policy's training rows for ``specialist_steps`` steps (the one
training loop, cross-entropy, the base's instruction inputs) → **one merge search** over the
base and the specialists, task vectors against the base (TIES / DARE-TIES / soup / SLERP ×
parameter subsets × bandit strategies), rewarded by the held-out protocol on the *tune* half →
base, every specialist and the merge per policy on the *test* half → the one release step →
promotion over ``models/default`` only if the merge beats the base there (no policy worse
beyond noise) and then the served folder on the released figures.

``recipe="paper"`` keeps the paper's ingredients from the pretrained encoder instead
(TaskGuard-FFT, GIP, GIP-FFT: ``training.stages.paper_recipe``).

Every stage resumes from the run folder (finished checkpoints are skipped, the trial log is
replayed), and ``stages.json`` records each stage's wall time.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.contract.policy import InputEncoder, InputTemplate, Policy, load_policies
from service.model.manifest import sha256_file
from training import paths
from training.data.rows import Example, summary_rows
from training.io import write_json_atomic
from training.merging.checkpoints import resolve_sources
from training.merging.params import MergeParams
from training.model.checkpoints import is_complete, read_meta
from training.model.loop import LoopConfig, resolve_precision
from training.release.finalize import ReleaseOptions
from training.search.run import SearchSettings
from training.stages.default import DEFAULT_LOOP, HELDOUT_FPR, SPLITS, prepare_split, train_checkpoint
from training.stages.finetune import RunContext
from training.stages.merge_release import MergePlan, search_release_promote
from training.stages.paper_recipe import paper_sources
from training.stages.specialists import check_base, train_specialists
from training.ui import Reporter, print_table

RECIPES = ("specialists", "paper")


@dataclass(frozen=True)
class UniGuardConfig:
    """The recipe's sizes (CPU defaults). ``base``: the multi-policy checkpoint the specialists continue."""

    recipe: str = "specialists"
    base: str = ""  # "": runs/default/checkpoint (make model's fine-tune; trained first when missing)
    specialist_steps: tuple[int, ...] = (75, 150)  # budgets: one specialist per policy and budget, one search
    batch_size: int = 32
    lr: float = 5e-5
    precision: str = "auto"
    max_length: int = 128
    stride: int = 32
    methods: tuple[str, ...] = ("ties", "dare_ties", "soup")
    strategies: tuple[str, ...] = ("ucb",)
    subsets: tuple[str, ...] = ("all", "no_head")
    iterations: int = 6
    top_k: int = 6
    search_rows: int = 400
    search_windows: int = 2
    heldout_per_cell: int = 20
    compare_per_cell: int = 60
    compare_windows: int = 4
    stage_validation_rows: int = 100  # per policy, for each checkpoint's own record (the search ranks them)
    seed: int = 13
    threads: int = 0
    device: str = "cpu"
    min_parity: float | None = 0.995
    # recipe="paper" only: TaskGuard / GIP / GIP-FFT sizes, and GIP alone for the zero-shot check across seeds
    taskguard_rows: int = 150
    gip_rows: int = 400
    finetune_rows: int = 150
    paper_batch_size: int = 16
    taskguard_lr: float = 8e-5
    gip_lr: float = 2e-4
    finetune_lr: float = 5e-5
    epochs: float = 1.0
    lambda_mlm: float = 0.1
    lambda_alice: float = 1.0
    gip_only: bool = False
    # checkpoint folders trained elsewhere on the same split, searched with the recipe's own
    extra_sources: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items() if k != "extra"}


class StageClock:
    """Wall time per stage in ``stages.json`` (a resumed stage records what this run spent). Entries
    of other stages stay: two budgets may run side by side in one run folder."""

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
            recorded = json.loads(self.path.read_text()) if self.path.exists() else {}
            write_json_atomic(self.path, {**recorded, name: self.seconds[name]})


def base_split(base: Path, run_dir: Path) -> None:
    """The base's own split (the run folder ``make model`` trained it in), copied once into ``run_dir``:
    specialists must never train on rows the base held out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    src = Path(base).parent
    if (run_dir / "validation.jsonl").exists() or not (src / "validation.jsonl").exists():
        return
    for name in (*SPLITS, "data_stats"):
        suffix = ".json" if name == "data_stats" else ".jsonl"
        if (src / f"{name}{suffix}").exists():
            shutil.copy2(src / f"{name}{suffix}", run_dir / f"{name}{suffix}")


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
    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {cfg.recipe!r}")
    reporter = reporter or Reporter()
    started = time.time()
    if cfg.extra_sources:  # a wrong folder fails now, not after the training stages
        resolve_sources([Path(p) for p in cfg.extra_sources])
    base = Path(cfg.base) if cfg.base else None
    clock = StageClock(Path(run_dir) / "stages.json")
    policies = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl"))
    if cfg.recipe == "specialists":
        base = base or paths.DEFAULT_RUN_DIR / "checkpoint"
        if not is_complete(base) and base.name == "checkpoint":  # a fresh clone: make model's fine-tune first
            with clock.stage("base (make model's fine-tune)"):
                train_base(base, data_dir, example_files, policies, cfg, reporter)
        check_base(base)
    with clock.stage("data"):
        if base is not None:
            base_split(base, run_dir)
        # make model's split whatever the training seed: seeds vary training, never the data.
        split = prepare_split(data_dir, example_files, set(policies), run_dir, DEFAULT_LOOP.seed)
    train, validation, heldout = split["train"], split["validation"], split["heldout"]
    if not heldout:
        raise ValueError("the recipe needs held-out rows: the out-of-source protocol rewards and promotes")
    print_table("Rows per policy and split", ["policy", "split", "rows", "unsafe fraction"], summary_rows(split))
    hashes = {p.name: sha256_file(p) for p in sorted(Path(data_dir).glob("*.jsonl")) + example_files}
    ctx = RunContext(run_dir, policies, cfg.max_length, cfg.stride, hashes, reporter, False, cfg.stage_validation_rows)
    extra: dict[str, Any] = {"recipe_config": cfg.as_dict()}
    if cfg.recipe == "specialists":
        assert base is not None
        sources = [base, *specialist_sources(base, ctx, train, validation, cfg, clock)]
        extra["base_checkpoint"] = {"path": str(base), "created_at": read_meta(base).get("created_at")}
    else:
        sources, zero = paper_sources(ctx, paths.base_model_path(), train, validation, policies, cfg, clock)
        extra["gip_zero_shot"] = zero
        if cfg.gip_only:  # the zero-shot check across seeds: GIP and its zero-shot rows, nothing else
            out = {"gip_zero_shot": zero, "seed": cfg.seed, "stage_seconds": clock.seconds}
            write_json_atomic(run_dir / "summary.json", out)
            return out
    specialists = cfg.recipe == "specialists"
    budgets = "+".join(map(str, cfg.specialist_steps))
    plan = MergePlan(
        sources=[*sources, *map(Path, cfg.extra_sources)],
        policies_dir=Path(policies_dir),
        run_dir=run_dir,
        merge_dir=run_dir / (f"merge-{budgets}" if specialists else "merge"),
        out_dir=out_dir,
        settings=search_settings(cfg),
        base=base,
        fallback_base=paths.base_model_path() if base is None else base,
        compare_per_cell=cfg.compare_per_cell,
        compare_windows=cfg.compare_windows,
        release=ReleaseOptions(HELDOUT_FPR, threads=cfg.threads, min_parity=cfg.min_parity),
        creation_command=creation_command,
        force=force,
        tag=f" ({budgets} steps)" if specialists else "",
    )
    return search_release_promote(plan, validation, heldout, policies, clock, reporter, extra, started)


def train_base(
    base: Path,
    data_dir: Path,
    example_files: list[Path],
    policies: dict[str, Policy],
    cfg: UniGuardConfig,
    reporter: Reporter,
) -> None:
    """``make model``'s checkpoint (its split, its loop) at ``base``, resumed from its last saved step."""
    split = prepare_split(data_dir, example_files, set(policies), base.parent, DEFAULT_LOOP.seed)
    encoder = InputEncoder.from_file(
        paths.base_model_path() / "tokenizer.json", InputTemplate(), cfg.max_length, cfg.stride
    )
    loop = replace(DEFAULT_LOOP, seed=cfg.seed, threads=cfg.threads, device=cfg.device,
                   precision=resolve_precision(cfg.precision, cfg.device))  # fmt: skip
    train_checkpoint(paths.base_model_path(), encoder, policies, split["train"], base.parent, loop, reporter)


def specialist_sources(
    base: Path, ctx: RunContext, train: list[Example], validation: list[Example], cfg: UniGuardConfig, clock: StageClock
) -> list[Path]:
    """Train (or resume) one specialist per policy for every budget of ``cfg.specialist_steps``: budgets
    differ in how far each specialist moves from the base, and the search weighs them all at once."""
    if not cfg.specialist_steps or min(cfg.specialist_steps) < 1:
        raise ValueError("specialist budgets are step counts >= 1 (--steps 75,150)")
    out: list[Path] = []
    for steps in cfg.specialist_steps:
        loop = LoopConfig(
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            max_steps=steps,
            seed=cfg.seed,
            device=cfg.device,
            threads=cfg.threads,
            save_every=50,
            precision=resolve_precision(cfg.precision, cfg.device),
        )
        with clock.stage(f"specialists ({steps} steps each)"):
            out += train_specialists(base, ctx, train, validation, policy_ids=sorted(ctx.policies), loop=loop)
    return out


def search_settings(cfg: UniGuardConfig) -> SearchSettings:
    return SearchSettings(
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
