"""``python -m training.cli pipeline …``: the UniGuard paper's stages, one command each.

data → taskguard → mtg → table (``all`` runs them in order), plus ``evaluate`` and
``export`` for any checkpoint. Every stage writes under ``runs/<run>/`` atomically and
skips what a previous run already finished (``--force`` retrains). Defaults are sized for
a 2-core CPU (the whole ``all`` run in well under an hour); README lists GPU settings.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from service.policy import DEFAULT_POLICIES_DIR, Policy, load_policies

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TaskGuard / MultiTaskGuard pipeline (arXiv 2504.19333).")
REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs"
DEFAULT_DATA = REPO.parent / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parent / "examples"
RUN_HELP = "Run name: outputs go to runs/<run>/."


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _record(run_dir: Path, stage: str, args: dict[str, Any], started: float) -> None:
    """Command, arguments and wall time of a stage, next to its outputs."""
    from training.export import write_json_atomic

    plain = {k: v for k, v in args.items() if not (callable(v) or inspect.ismodule(v))}  # not the imports
    write_json_atomic(run_dir / f"{stage}.json", {"command": " ".join(["python -m training.cli", *sys.argv[1:]]),
                                                   "args": json.loads(json.dumps(plain, default=str)),
                                                   "wall_seconds": round(time.time() - started, 1)})


def _defaults(command: Any) -> dict[str, Any]:
    """A typer command's option defaults, to call it from ``all`` with default settings."""
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()}


def _data(run: str, *, data_dir: Path = DEFAULT_DATA, examples_dir: Path = EXAMPLES, extra: list[Path] | None = None,
          train_only: list[Path] | None = None,
          policies_dir: Path = DEFAULT_POLICIES_DIR, val_fraction: float = 0.15, test_fraction: float = 0.15,
          seed: int = 13, force: bool = False, show: bool = True, any_config: bool = False):
    """Build (or reuse) ``runs/<run>/data``; returns (splits, policies, split hashes).

    Training stages pass ``any_config``: they use whatever split the ``data`` command built
    (with default settings when there is none yet).
    """
    from training.build_default import print_table
    from training.data import file_sha256
    from training.splits import add_train_only, build_splits, load_splits, save_splits, split_hashes, summary_rows

    run_dir = RUNS / run
    data_out = run_dir / "data"
    policies = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl")) + list(extra or [])
    config = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
              "example_files": [p.name for p in example_files], "policies": sorted(policies)}
    if train_only:
        config["train_only"] = [Path(p).name for p in train_only]
    if (data_out / "stats.json").exists() and not force:
        stats = json.loads((data_out / "stats.json").read_text(encoding="utf-8"))
        if stats.get("config") != config and not any_config:
            raise typer.BadParameter(f"{data_out} was built with {stats.get('config')}; pass --force to rebuild "
                                     "(checkpoints trained on it then retrain) or use another --run")
    else:
        hashes = {p.name: file_sha256(p) for p in sorted(Path(data_dir).glob("*.jsonl")) + example_files + list(train_only or [])}
        run_dir.mkdir(parents=True, exist_ok=True)
        built = build_splits(data_dir, example_files, set(policies), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        if train_only:
            for name, c in add_train_only(built, list(train_only), set(policies)).items():
                typer.echo(f"{name}: {c['added']} of {c['rows']} rows added to train ({c['held_out_text']} already held out, "
                           f"{c['duplicate']} duplicates)")
        save_splits(built, data_out, config, hashes)
    splits = load_splits(data_out)
    if show:
        print_table(f"Rows per policy and split ({data_out})", ["policy", "split", "rows", "unsafe fraction"], summary_rows(splits))
    return splits, policies, split_hashes(data_out)


def _base() -> Path:
    from training.build_default import base_model_path

    return base_model_path()


@app.command()
def data(
    run: str = typer.Option("issue4", help=RUN_HELP),
    data_dir: Path = typer.Option(DEFAULT_DATA, help="Folder of the public JSONL files (../shared/data)."),
    examples_dir: Path = typer.Option(EXAMPLES, help="Hand-written example JSONL files."),
    extra: list[Path] = typer.Option([], help="Generated JSONL (text, label, policy_id, rationale, source), split like "
                                              "the rest; repeatable."),
    train_only: list[Path] = typer.Option([], help="Generated JSONL added to train only (validation and test stay real "
                                                   "data, identical with or without it); repeatable."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR),
    val_fraction: float = typer.Option(0.15), test_fraction: float = typer.Option(0.15),
    seed: int = typer.Option(13), force: bool = typer.Option(False, help="Rebuild even if the split exists."),
) -> None:
    """Per-policy train / validation / test splits (deduplicated before splitting) and their table."""
    args, started = dict(locals()), time.time()
    _data(run, data_dir=data_dir, examples_dir=examples_dir, extra=extra, train_only=train_only, policies_dir=policies_dir,
          val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, force=force)
    _record(RUNS / run, "data", args, started)


@app.command()
def taskguard(
    run: str = typer.Option("issue4", help=RUN_HELP),
    policy: list[str] = typer.Option([], help="Policies to train (repeatable; default all)."),
    modes: str = typer.Option("fft,cft", help="fft (all weights) and/or cft (pooler + classifier)."),
    max_train: int = typer.Option(600, help="Training rows per policy (0: all; GPU: 0)."),
    max_length: int = typer.Option(128), stride: int = typer.Option(32),
    epochs: float = typer.Option(1.0), batch_size: int = typer.Option(16), lr: float = typer.Option(8e-5),
    head_epochs: int = typer.Option(30), head_lr: float = typer.Option(1e-3),
    threads: int = typer.Option(0, help="Torch threads (0: all cores). Use 1 when other jobs share the CPU: on a busy "
                                        "2-core box 2 oversubscribed OpenMP threads ran 5x slower than 1."),
    seed: int = typer.Option(13), device: str = typer.Option("cpu"), force: bool = typer.Option(False),
) -> None:
    """TaskGuard-FFT / -CFT: one binary guard per policy on plain prompts (no instruction)."""
    from training.pretrain import HeadConfig, LoopConfig
    from training.runs import Reporter
    from training.taskguard import run_taskguard

    args, started = dict(locals()), time.time()
    splits, policies, hashes = _data(run, show=False, any_config=True)
    run_taskguard(RUNS / run, _base(), policies, splits.train, splits.validation, policy_ids=policy or sorted(policies),
                  modes=_csv(modes), max_train=max_train, max_length=max_length, stride=stride,
                  loop=LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads),
                  head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
                  data_hashes=hashes, reporter=Reporter(), force=force)
    _record(RUNS / run, "taskguard", args, started)


@app.command()
def mtg(
    run: str = typer.Option("issue4", help=RUN_HELP),
    holdout: str = typer.Option("tax_advice", help="Policy kept out of GIP for the zero-shot check ('' for none)."),
    policy: list[str] = typer.Option([], help="Policies to fine-tune the GIP model on (default all)."),
    finetune: str = typer.Option("cft", help="Per-policy fine-tunes of the GIP checkpoint: cft and/or fft ('' for none). "
                                             "cft by default: with fft too the stage took 33 min on 2 cores, over the 30-min budget."),
    gip_max_train: int = typer.Option(800, help="GIP training rows per policy (0: all; GPU: 0)."),
    ft_max_train: int = typer.Option(300, help="Fine-tuning rows per policy (0: all)."),
    max_length: int = typer.Option(128), stride: int = typer.Option(32),
    gip_epochs: float = typer.Option(1.0), batch_size: int = typer.Option(16), gip_lr: float = typer.Option(
        2e-4, help="High for a short CPU run: at 8e-5 the CE of instruction inputs sat at ln 2 for the first ~80 steps."),
    lambda_mlm: float = typer.Option(0.1, help="MLM weight. 0.1 on CPU: in a short run the fresh MLM head's loss "
                                     "(~6) dominated the clipped gradient and CE did not move at 1.0; GPU runs: 1.0."),
    lambda_alice: float = typer.Option(1.0), lambda_cls: float = typer.Option(1.0),
    alice_eps: float = typer.Option(0.05, help="Per-token L2 radius of the embedding perturbation."),
    mlm_probability: float = typer.Option(0.15),
    ft_epochs: float = typer.Option(1.0), ft_lr: float = typer.Option(5e-5),
    head_epochs: int = typer.Option(30), head_lr: float = typer.Option(1e-3), save_every: int = typer.Option(50),
    threads: int = typer.Option(0, help="Torch threads (0: all cores). Use 1 when other jobs share the CPU: on a busy "
                                        "2-core box 2 oversubscribed OpenMP threads ran 5x slower than 1."),
    seed: int = typer.Option(13), device: str = typer.Option("cpu"), force: bool = typer.Option(False),
) -> None:
    """MultiTaskGuard: GIP (λ1·MLM + λ2·ALICE + λ3·CE on instruction inputs), then per-policy CFT / FFT."""
    from training.multitaskguard import run_mtg
    from training.pretrain import HeadConfig, LoopConfig
    from training.runs import Reporter

    args, started = dict(locals()), time.time()
    splits, policies, hashes = _data(run, show=False, any_config=True)
    if holdout and holdout not in policies:
        raise typer.BadParameter(f"unknown policy {holdout!r}", param_hint="--holdout")
    gip = LoopConfig(epochs=gip_epochs, batch_size=batch_size, lr=gip_lr, seed=seed, device=device, lambda_mlm=lambda_mlm,
                     lambda_alice=lambda_alice, lambda_cls=lambda_cls, alice_eps=alice_eps, mlm_probability=mlm_probability,
                     save_every=save_every, threads=threads)
    run_mtg(RUNS / run, _base(), policies, splits.train, splits.validation, holdout=holdout or None,
            policy_ids=policy or sorted(policies), finetune_modes=_csv(finetune), gip_max_train=gip_max_train,
            ft_max_train=ft_max_train, max_length=max_length, stride=stride, gip_loop=gip,
            ft_loop=LoopConfig(epochs=ft_epochs, batch_size=batch_size, lr=ft_lr, seed=seed, device=device, threads=threads),
            head=HeadConfig(epochs=head_epochs, lr=head_lr, seed=seed, device=device, threads=threads),
            data_hashes=hashes, reporter=Reporter(), force=force)
    _record(RUNS / run, "mtg", args, started)


@app.command()
def table(
    run: str = typer.Option("issue4", help=RUN_HELP),
    holdout: str = typer.Option("tax_advice"),
    out: Path = typer.Option(None, help="Markdown file (default runs/<run>/table.md)."),
) -> None:
    """The closing table (validation F1 / ROC-AUC per family and policy, zero-shot row) from checkpoints.json."""
    from training.runs import closing_table

    policies = sorted(load_policies(DEFAULT_POLICIES_DIR))
    text = closing_table(RUNS / run, policies, holdout or None)
    target = out or RUNS / run / "table.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    typer.echo(text)


def _checkpoint_overrides(model: Path, max_length: int | None, template: str) -> dict[str, Any]:
    """Window / template overrides for a checkpoint (an ONNX folder's manifest always decides)."""
    from training.modeling import MTG_TEMPLATE, TASKGUARD_TEMPLATE

    if (model / "manifest.json").exists():
        return {}
    if template not in ("auto", "mtg", "taskguard"):
        raise typer.BadParameter("auto, mtg or taskguard", param_hint="--template")
    out: dict[str, Any] = {"max_length": max_length} if max_length else {}
    if template != "auto":
        out["template"] = MTG_TEMPLATE if template == "mtg" else TASKGUARD_TEMPLATE
    return out


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Checkpoint folder (config.json) or exported model folder (manifest.json)."),
    data_file: Path = typer.Argument(..., help="JSONL with text and label (and policy_id unless --policy)."),
    policy: str = typer.Option(None, help="Map every row to this policy."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR),
    threshold: float = typer.Option(0.5, help="Unsafe if the score is at least this."),
    batch_size: int = typer.Option(1, help="1: per-request latency; larger: batch-amortised throughput."),
    limit: int = typer.Option(0, help="Score only the first N rows (0: all)."),
    max_length: int = typer.Option(None, help="Checkpoints only: window override (default: its uniguard.json)."),
    template: str = typer.Option("auto", help="Checkpoints only: auto (its uniguard.json, else mtg), mtg or taskguard."),
    out: Path = typer.Option(None, help="Folder for report.json + report.md (default runs/eval/<model>-<data>)."),
) -> None:
    """Precision, recall, F1, FPR, ROC-AUC and p50/p95 latency per policy; rich table, JSON + Markdown."""
    from training.build_default import print_table
    from training.export import write_json_atomic
    from training.harness import COLUMNS, evaluate_path, markdown_report, read_test_rows
    from training.runs import Reporter

    policies: dict[str, Policy] = load_policies(policies_dir)
    rows = read_test_rows(data_file, policies, policy, limit or None)
    with Reporter().task(f"score {model.name}") as update:
        result = evaluate_path(model, rows, policies, threshold=threshold, batch_size=batch_size, data_name=str(data_file),
                               progress=lambda d, t: update(d, t, ""),
                               **_checkpoint_overrides(model, max_length, template))
    print_table(f"{result['scorer']} on {data_file.name} (threshold {threshold})", ["policy", *COLUMNS],
                [(pid, *(m.get(c) for c in COLUMNS)) for pid, m in result["policies"].items()])
    target = out or RUNS / "eval" / f"{model.resolve().name}-{data_file.stem}"
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "report.json", result)
    (target / "report.md").write_text(markdown_report(result), encoding="utf-8")
    typer.echo(f"wrote {target}/report.json and report.md")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A pipeline checkpoint folder."),
    out: Path = typer.Argument(..., help="Model folder to write (what the service and `evaluate` load)."),
    quantize: bool = typer.Option(True, help="Dynamic int8 (the CPU serving format)."),
) -> None:
    """ONNX export through training.export, manifest carrying the checkpoint's input template and window."""
    from training.export import export_model_folder, write_json_atomic
    from training.modeling import read_meta, template_of

    meta = read_meta(checkpoint)
    policies = load_policies(DEFAULT_POLICIES_DIR)
    entries = {pid: {"threshold": 0.5, "description_sha256": p.description_sha256()} for pid, p in policies.items()}
    manifest = export_model_folder(checkpoint, out, name=f"uniguard-{meta.get('family', 'checkpoint')}", base_model=str(meta.get("init", "")),
                                   max_length=int(meta.get("max_length", 128)), stride=int(meta.get("stride", 32)),
                                   creation_command="python -m training.cli " + " ".join(sys.argv[1:]), policies=entries,
                                   data_hashes=meta.get("data_hashes", {}), training={"family": meta.get("family"), "policy": meta.get("policy")},
                                   quantize=quantize)
    manifest.input_template = template_of(meta)
    write_json_atomic(out / "manifest.json", json.loads(manifest.model_dump_json()))
    typer.echo(f"wrote {out} ({manifest.files[0].precision}, template {manifest.input_template.model_dump()})")


@app.command("all")
def all_cmd(
    run: str = typer.Option("issue4", help=RUN_HELP),
    holdout: str = typer.Option("tax_advice"),
    table_out: Path = typer.Option(None, help="Also write the closing table here."),
) -> None:
    """data → taskguard → mtg → table with default settings (resumes whatever is finished)."""
    started = time.time()
    for stage in (data, taskguard, mtg):
        t0 = time.time()
        settings = _defaults(stage) | {"run": run}
        if "holdout" in settings:
            settings["holdout"] = holdout
        stage(**settings)
        typer.echo(f"{stage.__name__}: {time.time() - t0:.0f} s")
    table(run=run, holdout=holdout, out=None)
    if table_out:
        table_out.write_text((RUNS / run / "table.md").read_text(encoding="utf-8"), encoding="utf-8")
    typer.echo(f"all stages: {(time.time() - started) / 60:.1f} min")
