"""``python -m training data``: per-policy train / validation / test splits of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR, Policy, load_policies
from service.model.manifest import sha256_file
from training import paths
from training.cli.common import RUN_HELP, DataDirOption, record
from training.data.rows import summary_rows
from training.ui import print_table

if TYPE_CHECKING:
    from training.data.splits import Splits

# The data modules (scikit-learn) are imported inside the functions: `--help` must stay instant.


def run_splits(
    run: str,
    *,
    data_dir: Path = paths.DEFAULT_DATA,
    examples_dir: Path = paths.EXAMPLES,
    extra: list[Path] | None = None,
    train_only: list[Path] | None = None,
    policies_dir: Path = DEFAULT_POLICIES_DIR,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 13,
    force: bool = False,
    show: bool = True,
    any_config: bool = False,
) -> tuple[Splits, dict[str, Policy], dict[str, str]]:
    """Build (or reuse) ``runs/<run>/data``; returns (splits, policies, split hashes).

    Training stages pass ``any_config``: they use whatever split the ``data`` command built
    (with default settings when there is none yet).
    """
    from training.data.splits import add_train_only, build_splits, load_splits, save_splits, split_hashes

    run_dir = paths.RUNS / run
    data_out = run_dir / "data"
    policies: dict[str, Policy] = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl")) + list(extra or [])
    config: dict[str, object] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "example_files": [p.name for p in example_files],
        "policies": sorted(policies),
    }
    if train_only:
        config["train_only"] = [Path(p).name for p in train_only]
    if (data_out / "stats.json").exists() and not force:
        stats = json.loads((data_out / "stats.json").read_text(encoding="utf-8"))
        if stats.get("config") != config and not any_config:
            raise typer.BadParameter(
                f"{data_out} was built with {stats.get('config')}; pass --force to rebuild "
                "(checkpoints trained on it then retrain) or use another --run"
            )
    else:
        inputs = sorted(Path(data_dir).glob("*.jsonl")) + example_files + list(train_only or [])
        hashes = {p.name: sha256_file(p) for p in inputs}
        run_dir.mkdir(parents=True, exist_ok=True)
        built = build_splits(
            data_dir, example_files, set(policies), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        if train_only:
            for name, c in add_train_only(built, list(train_only), set(policies)).items():
                typer.echo(
                    f"{name}: {c['added']} of {c['rows']} rows added to train ({c['held_out_text']} already "
                    f"held out, {c['duplicate']} duplicates)"
                )
        save_splits(built, data_out, config, hashes)
    splits = load_splits(data_out)
    if show:
        print_table(
            f"Rows per policy and split ({data_out})",
            ["policy", "split", "rows", "unsafe fraction"],
            summary_rows(splits.named()),
        )
    return splits, policies, split_hashes(data_out)


def data(
    run: Annotated[str, typer.Option(help=RUN_HELP)] = "paper",
    data_dir: DataDirOption = paths.DEFAULT_DATA,
    examples_dir: Annotated[Path, typer.Option(help="Hand-written example JSONL files.")] = paths.EXAMPLES,
    extra: Annotated[
        list[Path] | None,
        typer.Option(
            help="Generated JSONL (text, label, policy_id, rationale, source), split like the rest; repeatable."
        ),
    ] = None,
    train_only: Annotated[
        list[Path] | None,
        typer.Option(
            help="Generated JSONL added to train only (validation and test stay real "
            "data, identical with or without it); repeatable."
        ),
    ] = None,
    policies_dir: Annotated[Path, typer.Option()] = DEFAULT_POLICIES_DIR,
    val_fraction: Annotated[float, typer.Option()] = 0.15,
    test_fraction: Annotated[float, typer.Option()] = 0.15,
    seed: Annotated[int, typer.Option()] = 13,
    force: Annotated[bool, typer.Option(help="Rebuild even if the split exists.")] = False,
) -> None:
    """Per-policy train / validation / test splits (deduplicated before splitting) and their table."""
    args, started = dict(locals()), time.time()
    run_splits(
        run,
        data_dir=data_dir,
        examples_dir=examples_dir,
        extra=extra,
        train_only=train_only,
        policies_dir=policies_dir,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        force=force,
    )
    record(paths.RUNS / run, "data", args, started)
