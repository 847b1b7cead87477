"""Run-folder bookkeeping: progress bars, the checkpoint index, the closing table.

``runs/<name>/checkpoints.json`` lists every finished checkpoint with its family
(taskguard-fft, taskguard-cft, mtg-gip, mtg-cft, mtg-fft), policy and validation scores,
so the merging stage picks its top-k from one file instead of walking folders.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from training.export import write_json_atomic

INDEX_FILE = "checkpoints.json"
Update = Callable[[int, int, str], None]


class Reporter:
    """Rich progress bars on a terminal, a line every ``every`` steps in logs, nothing in tests."""

    def __init__(self, enabled: bool = True, every: int = 25) -> None:
        self.enabled = enabled
        self.every = every

    @contextmanager
    def task(self, description: str) -> Iterator[Update]:
        if not self.enabled:
            yield lambda done, total, info="": None
            return
        from training.build_default import console, progress_bar

        with progress_bar() as bar:
            tid = bar.add_task(description, total=None, info="")

            def update(done: int, total: int, info: str = "") -> None:
                bar.update(tid, completed=done, total=total, info=info)
                if not console.is_terminal and (done % self.every == 0 or done == total):
                    console.print(f"{description} {done}/{total} {info}")  # logs without a live bar

            yield update

    def print(self, *objects: Any) -> None:
        if self.enabled:
            from training.build_default import console

            console.print(*objects)


def read_index(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / INDEX_FILE
    return json.loads(path.read_text(encoding="utf-8"))["checkpoints"] if path.exists() else []


def register(run_dir: Path, checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Add or replace a checkpoint's entry in the index (written atomically)."""
    val = meta.get("validation", {})
    own = [meta["policy"]] if meta.get("policy") else meta.get("trained_policies", [])
    f1s = [val[p]["f1"] for p in own if p in val and val[p].get("f1") is not None]
    entry = {
        "path": str(Path(checkpoint).resolve().relative_to(Path(run_dir).resolve())),
        "family": meta["family"],
        "policy": meta.get("policy"),
        "trained_policies": meta.get("trained_policies", [meta.get("policy")]),
        "parent": meta.get("parent"),
        "validation_f1": round(sum(f1s) / len(f1s), 4) if f1s else None,
        "validation_f1_by_policy": {p: m.get("f1") for p, m in val.items()},
        "validation_roc_auc_by_policy": {p: m.get("roc_auc") for p, m in val.items()},
        "threshold": 0.5,
        "input_template": meta.get("input_template"),
        "max_length": meta.get("max_length"),
    }
    entries = [e for e in read_index(run_dir) if e["path"] != entry["path"]] + [entry]
    entries.sort(key=lambda e: (e["family"], e["policy"] or ""))
    write_json_atomic(Path(run_dir) / INDEX_FILE, {"run": Path(run_dir).name, "checkpoints": entries})
    return entry


ROW_LABELS = {
    "taskguard-fft": "TaskGuard-FFT (one model per policy)",
    "taskguard-cft": "TaskGuard-CFT (one model per policy)",
    "mtg-gip": "MultiTaskGuard (GIP, no fine-tune)",
    "mtg-cft": "MultiTaskGuard + CFT (per policy)",
    "mtg-fft": "MultiTaskGuard + FFT (per policy)",
}


def _cell(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def closing_table(run_dir: Path, policies: list[str], holdout: str | None) -> str:
    """The issue's table: F1 / ROC-AUC (threshold 0.5) per family and policy on validation, plus zero-shot."""
    entries = read_index(run_dir)
    metric_rows: dict[str, dict[str, dict]] = {}
    for e in entries:
        meta = json.loads((Path(run_dir) / e["path"] / "uniguard.json").read_text(encoding="utf-8"))
        val = meta.get("validation", {})
        row = metric_rows.setdefault(e["family"], {})
        for pid, m in val.items():
            if e["policy"] is None or pid == e["policy"]:
                row[pid] = m
    lines = [f"Validation split of `{Path(run_dir).name}`, threshold 0.5 (no tuning on the scored split), "
             "scores through the service's InputEncoder (windows, max).", ""]
    for metric, title in (("f1", "F1 (unsafe = positive)"), ("roc_auc", "ROC-AUC")):
        seen = [p for p in policies if p != holdout]
        lines += [f"### {title}", "", "| model | " + " | ".join(policies) + f" | mean | mean w/o {holdout or '—'} |",
                  "|---" * (len(policies) + 3) + "|"]
        for fam, label in ROW_LABELS.items():
            if fam not in metric_rows:
                continue
            vals = {p: metric_rows[fam].get(p, {}).get(metric) for p in policies}
            cells = [_cell(vals[p]) + (" (zero-shot)" if fam == "mtg-gip" and p == holdout else "") for p in policies]
            got = [v for v in vals.values() if v is not None]
            got_seen = [vals[p] for p in seen if vals[p] is not None]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_cell(sum(got) / len(got) if got else None)} | "
                         f"{_cell(sum(got_seen) / len(got_seen) if got_seen else None)} |")
        lines.append("")
    if holdout:
        lines += [f"### Zero-shot: `{holdout}` held out of GIP", "",
                  "| model | trained on it | n | precision | recall | F1 | FPR | ROC-AUC |", "|---|---|---|---|---|---|---|---|"]
        for fam, trained in (("mtg-gip", "no (zero-shot)"), ("taskguard-fft", "yes"), ("taskguard-cft", "yes"), ("mtg-cft", "yes (head only)")):
            m = metric_rows.get(fam, {}).get(holdout)
            if m:
                lines.append(f"| {ROW_LABELS[fam]} | {trained} | {m['n']} | {_cell(m['precision'])} | {_cell(m['recall'])} | "
                             f"{_cell(m['f1'])} | {_cell(m['fpr'])} | {_cell(m['roc_auc'])} |")
        lines.append("")
    return "\n".join(lines)
