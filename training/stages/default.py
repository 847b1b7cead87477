"""The shipped default model (``make model``): a preset of the one training loop.

Cross-entropy only (``λ = (0, 0, 1)``), instruction inputs for every policy, on the
balanced multi-policy set of ``training.data.build`` (one train / validation split kept in
the run folder), then exported and released like every other model folder, and promoted
over ``models/default`` only if it beats it. Every stage resumes from the run folder: the
split, the checkpoint (and a half-trained one from its last saved step), the export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from service.contract.policy import InputEncoder, InputTemplate, Policy, load_policies
from service.model.manifest import sha256_file
from training.data.build import build_dataset
from training.data.rows import Example, read_examples, summary_rows, write_examples
from training.eval.heldout import HEADER, POLICY_HEADER, cells_table, policy_table
from training.eval.parity import MIN_VERDICT_AGREEMENT
from training.eval.report import print_report
from training.eval.thresholds import ThresholdTarget
from training.io import write_json_atomic
from training.model.batches import encode_rows
from training.model.checkpoints import save_checkpoint
from training.model.loop import LoopConfig, train_loop
from training.model.modeling import load_classifier
from training.paths import BASE_MODEL_NAME, base_model_path
from training.release.export import ExportSpec
from training.release.finalize import Release, ReleaseOptions, heldout_of_folder, release_checkpoint
from training.release.optimize import Quantization
from training.release.promote import promote
from training.ui import Reporter, console, print_table

NAME = "uniguard-default"
# The preset: one pass over ~15k rows at batch 32 takes ~20 min on 2 cores.
DEFAULT_LOOP = LoopConfig(
    epochs=1.0,
    batch_size=32,
    lr=8e-5,
    warmup_ratio=0.06,
    weight_decay=0.01,
    max_grad_norm=1.0,
    seed=13,
    lambda_mlm=0.0,
    lambda_alice=0.0,
    lambda_cls=1.0,
    save_every=100,
)
SPLITS = ("train", "validation", "heldout")
# Thresholds: the held-out sensitivity levels (strict / balanced / permissive, training.eval.heldout).
HELDOUT_FPR = ThresholdTarget("levels")


def prepare_split(
    data_dir: Path, example_files: list[Path], policies: set[str], run_dir: Path, seed: int
) -> dict[str, list[Example]]:
    """``run_dir/{train,validation}.jsonl``, built once; a rerun reads them back."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "validation.jsonl").exists():
        ds = build_dataset(data_dir, example_files, policies, seed=seed)
        write_examples(run_dir / "train.jsonl", ds.train)
        write_examples(run_dir / "validation.jsonl", ds.validation)
        write_examples(run_dir / "heldout.jsonl", ds.heldout)
        write_json_atomic(run_dir / "data_stats.json", ds.stats)
    return {
        name: read_examples(run_dir / f"{name}.jsonl") if (run_dir / f"{name}.jsonl").exists() else []
        for name in SPLITS
    }


def train_checkpoint(
    base: Path,
    encoder: InputEncoder,
    policies: dict[str, Policy],
    train: list[Example],
    run_dir: Path,
    loop: LoopConfig,
    reporter: Reporter,
) -> Path:
    """``run_dir/checkpoint``: the base encoder fine-tuned on the first window of every row."""
    ckpt = run_dir / "checkpoint"
    if (ckpt / "config.json").exists():
        reporter.print(f"[dim]skip fine-tune: {ckpt} exists")
        return ckpt
    state_dir = run_dir / ".state-checkpoint"
    settings = {
        "loop": {k: v for k, v in loop.to_dict().items() if k not in ("threads", "save_every")},
        "rows": len(train),
    }
    if (state_dir / "settings.json").exists() and json.loads((state_dir / "settings.json").read_text()) != settings:
        shutil.rmtree(state_dir)  # a half-trained state of other settings: start again, never mix the two
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_dir / "settings.json", settings)
    model = load_classifier(base, seed=loop.seed)
    with reporter.task("fine-tune") as update:
        log = train_loop(
            model,
            encode_rows(encoder, policies, train, windows=True, seed=loop.seed),
            loop,
            state_dir=state_dir,
            progress=update,
        )
    meta = {
        "family": "default",
        "policy": None,
        "trained_policies": sorted(policies),
        "init": str(base),
        "input_template": encoder.template.model_dump(),
        "max_length": encoder.max_length,
        "stride": encoder.stride,
        "config": {"loop": loop.to_dict()},
        "train_log": log,
    }
    save_checkpoint(model, base, ckpt, meta)
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: no step to resume from
    return ckpt


def build_default(
    data_dir: Path,
    examples_dir: Path,
    policies_dir: Path,
    out_dir: Path,
    run_dir: Path,
    *,
    max_length: int,
    stride: int,
    loop: LoopConfig = DEFAULT_LOOP,
    force: bool = False,
    target: ThresholdTarget = HELDOUT_FPR,
    creation_command: str = "make model",
    reporter: Reporter | None = None,
    min_parity: float | None = MIN_VERDICT_AGREEMENT,
    quantization: Quantization | None = None,
) -> Release:
    """Train, export and release ``run_dir/export``; promote it to ``out_dir`` if it is better (or ``force``).

    ``min_parity``: the release fails if the served file's verdicts agree with the fp32
    checkpoint's on fewer validation rows than this (None: measured and recorded only).
    ``quantization``: the serving graph's int8 scheme (None: the project's default)."""
    reporter = reporter or Reporter()
    started = time.time()
    policies = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl"))
    split = prepare_split(data_dir, example_files, set(policies), run_dir, loop.seed)
    train, validation, heldout = split["train"], split["validation"], split["heldout"]
    print_table("Rows per policy and split", ["policy", "split", "rows", "unsafe fraction"], summary_rows(split))

    base = base_model_path()
    encoder = InputEncoder.from_file(base / "tokenizer.json", InputTemplate(), max_length, stride)
    ckpt = train_checkpoint(base, encoder, policies, train, run_dir, loop, reporter)
    export_dir = run_dir / "export"
    hashes = {p.name: sha256_file(p) for p in sorted(Path(data_dir).glob("*.jsonl")) + example_files}
    with reporter.task("score validation (onnxruntime, service loader)") as update:
        release = release_checkpoint(
            ckpt,
            export_dir,
            validation,
            policies,
            export_dir=export_dir,
            spec=ExportSpec(
                NAME,
                BASE_MODEL_NAME,
                max_length,
                stride,
                creation_command,
                InputTemplate(),
                data_hashes=hashes,
                training={"config": loop.to_dict(), "train_rows": len(train)},
                quantization=quantization,
            ),
            options=ReleaseOptions(
                target, train_rows=len(train), minutes=(time.time() - started) / 60, min_parity=min_parity
            ),
            progress=lambda d, t: update(d, t, ""),
            heldout=heldout,
        )
    print_report(release.report)
    if release.heldout is not None:
        print_table("Out of source (held-out test half)", HEADER, cells_table(release.heldout.as_dict()))
        for name, result in (release.levels or {}).items():
            print_table(f"Per policy at {name} (held-out test half)", POLICY_HEADER, policy_table(result.as_dict()))

    def summary(folder: Path) -> float | None:
        if folder == export_dir and release.heldout is not None:
            return release.heldout.summary
        result = heldout_of_folder(folder, heldout, policies)
        return None if result is None else result.summary

    done, why = promote(export_dir, out_dir, force=force, score=summary if heldout else None)
    if done:
        console.print(
            f"[green]wrote {out_dir} (mean validation F1 {release.mean_f1:.4f}; {why}) "
            f"in {(time.time() - started) / 60:.1f} min"
        )
    else:
        console.print(f"[yellow]kept {out_dir}: {why}; the new model stays in {export_dir} (use --force to replace)")
    print(release.card)
    return release
