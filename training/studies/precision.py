"""Training arithmetic: fp32 against bf16 autocast, for speed and for held-out quality.

Both runs train the shipped base on the same rows, steps and seed (the capacity trial's budget
and scorer, so the figures are the release step's: temperature, balanced thresholds on the tune
half, the out-of-source summary on the test half), and differ only in ``LoopConfig.precision``.
Step time is measured separately, the two precisions interleaved run by run, so the box's
drift hits both alike.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.contract.policy import InputEncoder, InputTemplate, Policy
from training.data.rows import Example
from training.data.splits import subsample
from training.eval.heldout import POLICY_HEADER, policy_table
from training.model.batches import encode_rows
from training.model.loop import LoopConfig, train_loop
from training.model.modeling import load_classifier
from training.studies.capacity import Budget, trial
from training.ui import Reporter

PRECISIONS = ("fp32", "bf16")


def step_times(
    base: Path, split: dict[str, list[Example]], policies: dict[str, Policy], loop: LoopConfig, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per training step of each precision, ``rounds`` short runs each, interleaved."""
    encoder = InputEncoder.from_file(base / "tokenizer.json", InputTemplate(), 128, 32)
    data = encode_rows(encoder, policies, subsample(split["train"], 200, loop.seed), windows=True, seed=loop.seed)
    out: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for precision in PRECISIONS:
            model = load_classifier(base, seed=loop.seed)
            cfg = replace(loop, max_steps=steps, precision=precision, save_every=0)
            started = time.perf_counter()
            train_loop(model, data, cfg)
            out[precision].append((time.perf_counter() - started) / steps)
    return out


def precision_study(
    base: Path,
    split: dict[str, list[Example]],
    policies: dict[str, Policy],
    work: Path,
    budget: Budget,
    loop: LoopConfig,
    reporter: Reporter,
    timing_steps: int = 10,
    rounds: int = 2,
) -> dict[str, Any]:
    """Held-out figures of a run per precision (resumable), then interleaved step times."""
    records = {p: trial(f"minilm-{p}", base, split, policies, work, budget, replace(loop, precision=p), reporter)
               for p in PRECISIONS}  # fmt: skip
    with reporter.task("step times, interleaved"):
        times = step_times(base, split, policies, loop, timing_steps, rounds)
    return {"records": records, "step_s": times, "budget": budget.__dict__}


def markdown(study: dict[str, Any]) -> str:
    """The study's table: step time, summary and the per-policy rows of each precision."""
    lines = ["| precision | s/step (each run) | min s/step | held-out summary |", "|---|---|---:|---:|"]
    for p in PRECISIONS:
        t = study["step_s"][p]
        summary = study["records"][p]["heldout"]["summary"]
        lines.append(f"| {p} | {' / '.join(f'{x:.2f}' for x in t)} | {min(t):.2f} | {summary:.4f} |")
    for p in PRECISIONS:
        lines += ["", f"**{p}**, per policy (test half, balanced level):", "",
                  "| " + " | ".join(POLICY_HEADER) + " |", "|" + "---|" * len(POLICY_HEADER)]  # fmt: skip
        lines += ["| " + " | ".join(r) + " |" for r in policy_table(study["records"][p]["heldout"])]
    return "\n".join(lines) + "\n"
