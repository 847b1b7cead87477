"""Reports: the evaluate command's result and Markdown, and the pipeline's closing table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.contract.policy import Policy
from training.data.rows import Example
from training.eval.metrics import metrics_by_policy
from training.eval.scoring import Progress, load_scorer, score
from training.model.checkpoints import META_FILE, read_index
from training.ui import cell, print_table

COLUMNS = ("n", "unsafe", "precision", "recall", "f1", "fpr", "roc_auc", "latency_ms_p50", "latency_ms_p95")


def evaluate_path(
    model: Path,
    examples: list[Example],
    policies: dict[str, Policy],
    *,
    threshold: float = 0.5,
    batch_size: int = 1,
    data_name: str = "",
    progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Score ``examples`` with the model at ``model`` and return the full result (JSON-able)."""
    scorer = load_scorer(model, **overrides)
    scores, latency = score(scorer, examples, policies, batch_size=batch_size, progress=progress)
    return {
        "model": str(model),
        "kind": scorer.kind,
        "scorer": scorer.name,
        "data": data_name,
        "threshold": threshold,
        "batch_size": batch_size,
        "policies": metrics_by_policy(examples, scores, latency, threshold),
        "scores": [round(float(s), 6) for s in scores],
    }


def markdown_report(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table (one row per policy)."""
    amortised = "" if result["batch_size"] == 1 else ", batch-amortised"
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"- scorer: {result['kind']} ({result['scorer']}), data: `{result['data']}`, threshold {result['threshold']}, "
        f"batch size {result['batch_size']} (latency per sample{amortised})",
        "",
        "| policy | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for pid, m in result["policies"].items():
        lines.append(f"| {pid} | " + " | ".join(cell(m.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


ROW_LABELS = {
    "taskguard-fft": "TaskGuard-FFT (one model per policy)",
    "taskguard-cft": "TaskGuard-CFT (one model per policy)",
    "mtg-gip": "MultiTaskGuard (GIP, no fine-tune)",
    "mtg-cft": "MultiTaskGuard + CFT (per policy)",
    "mtg-fft": "MultiTaskGuard + FFT (per policy)",
}


def closing_table(run_dir: Path, policies: list[str], holdout: str | None) -> str:
    """The paper's table: F1 / ROC-AUC (threshold 0.5) per family and policy on validation, plus zero-shot."""
    entries = read_index(run_dir)
    metric_rows: dict[str, dict[str, dict]] = {}
    for e in entries:
        meta = json.loads((Path(run_dir) / e["path"] / META_FILE).read_text(encoding="utf-8"))
        val = meta.get("validation", {})
        row = metric_rows.setdefault(e["family"], {})
        for pid, m in val.items():
            if e["policy"] is None or pid == e["policy"]:
                row[pid] = m
    lines = [
        f"Validation split of `{Path(run_dir).name}`, threshold 0.5 (no tuning on the scored split), "
        "scores through the service's InputEncoder (windows, max).",
        "",
    ]
    for metric, title in (("f1", "F1 (unsafe = positive)"), ("roc_auc", "ROC-AUC")):
        seen = [p for p in policies if p != holdout]
        lines += [
            f"### {title}",
            "",
            "| model | " + " | ".join(policies) + f" | mean | mean w/o {holdout or '—'} |",
            "|---" * (len(policies) + 3) + "|",
        ]
        for fam, label in ROW_LABELS.items():
            if fam not in metric_rows:
                continue
            vals = {p: metric_rows[fam].get(p, {}).get(metric) for p in policies}
            cells = [cell(vals[p]) + (" (zero-shot)" if fam == "mtg-gip" and p == holdout else "") for p in policies]
            got = [v for v in vals.values() if v is not None]
            got_seen = [vals[p] for p in seen if vals[p] is not None]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {cell(sum(got) / len(got) if got else None)} | "
                f"{cell(sum(got_seen) / len(got_seen) if got_seen else None)} |"
            )
        lines.append("")
    if holdout:
        lines += [
            f"### Zero-shot: `{holdout}` held out of GIP",
            "",
            "| model | trained on it | n | precision | recall | F1 | FPR | ROC-AUC |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fam, trained in (
            ("mtg-gip", "no (zero-shot)"),
            ("taskguard-fft", "yes"),
            ("taskguard-cft", "yes"),
            ("mtg-cft", "yes (head only)"),
        ):
            m = metric_rows.get(fam, {}).get(holdout)
            if m:
                lines.append(
                    f"| {ROW_LABELS[fam]} | {trained} | {m['n']} | {cell(m['precision'])} | {cell(m['recall'])} | "
                    f"{cell(m['f1'])} | {cell(m['fpr'])} | {cell(m['roc_auc'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def print_report(rep: dict[str, dict[str, Any]]) -> None:
    """A release report (``training.eval.metrics.report``) as two console tables: per policy, per source."""
    print_table(
        "Validation per policy (service loader, calibrated scores, source-balanced thresholds)",
        ["policy", "threshold", "n", "precision", "recall", "F1", "FPR", "ROC-AUC"],
        [
            (
                pid,
                e["threshold"],
                e["overall"]["n"],
                e["overall"]["precision"],
                e["overall"]["recall"],
                e["overall"]["f1"],
                e["overall"]["fpr"],
                e["overall"]["roc_auc"],
            )
            for pid, e in rep.items()
        ],
    )
    print_table(
        "Validation per source",
        ["policy", "source", "n", "unsafe", "recall", "FPR", "F1"],
        [
            (pid, src, s["n"], s["unsafe"], s["recall"], s["fpr"], s["f1"])
            for pid, e in rep.items()
            for src, s in e["by_source"].items()
        ],
    )
