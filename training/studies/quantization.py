"""Speed and fidelity of each serving-graph format on one model (``python -m training quant-study``).

Why: the export's choice (fused, then per-token int8) trades speed against two properties a
guard needs: verdicts that match the fp32 model, and a score that does not move with the
prompt's batch-mates. This measures all three for every format on the same weights, so the
choice can be re-checked on another CPU (int8 gains depend on AVX-512 VNNI).

The fp32 reference is the checkpoint's fp32 ONNX export, or, for a folder whose checkpoint is
gone (the shipped ``models/default`` predates the fused export), its dynamic-int8 graph turned
back into fp32 MatMuls with the dequantised weights (``dequantize``): the same weights, the
rounding of int8 weights included, minus the per-batch activation rounding.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from service.contract.policy import InputEncoder, Policy, pad_batch
from service.model.calibration import apply_calibration
from service.model.int8_weights import adapt_weights, best_weight_sign
from service.model.manifest import read_manifest
from training.release.optimize import QUANTIZATIONS, count_nodes, optimize_for_cpu, save_rewritten

Row = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # policy id, ids, mask, type ids
SHAPES = ((1, 48, 60), (8, 128, 12), (32, 80, 6))  # batch, tokens, timed calls


def dequantize(int8_model: Path, out: Path) -> Path:
    """MatMulInteger (+ DynamicQuantizeLinear, Cast, Mul) back to fp32 MatMul, and Gathers of
    quantised embedding tables back to fp32 tables: an fp32 graph with the int8 model's weights."""
    model = onnx.load(str(int8_model))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producer.get(name)
        return numpy_helper.to_array(p.attribute[0].t) if p is not None and p.op_type == "Constant" else None

    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for n in g.node:
        if n.op_type == "MatMulInteger":
            xq, wq, _, wzp = n.input
            x = producer[xq].input[0]
            cast = consumers[n.output[0]][0]
            mul = consumers[cast.output[0]][0]
            scales = producer[next(i for i in mul.input if i != cast.output[0])]
            wq_value = const(wq)
            if wq_value is not None:  # a weight: dequantise it
                w_scale = next(v for v in (const(i) for i in scales.input) if v is not None)
                zp = const(wzp)
                w = (wq_value.astype(np.float32) - (zp.astype(np.float32) if zp is not None else 0.0)) * w_scale
                wname = f"{wq}_fp32"
                g.initializer.append(numpy_helper.from_array(w.astype(np.float32), wname))
            else:  # activation x activation: both sides back to their float inputs
                wname = producer[wq].input[0]
            replaced[id(mul)] = helper.make_node("MatMul", [x, wname], [mul.output[0]])
            removed.update({id(n), id(cast)})
        elif n.op_type == "MatMulIntegerToFloat" and n.input[1] in inits:  # a per-token graph
            xq, wq, _, w_scale_name = n.input[:4]
            x = producer[xq].input[0]  # the QuantizeLinear's float input
            wq_value, w_scale = const(wq), const(w_scale_name)
            zp = const(n.input[5]) if len(n.input) > 5 and n.input[5] else None
            assert wq_value is not None and w_scale is not None
            w = (wq_value.astype(np.float32) - (zp.astype(np.float32) if zp is not None else 0.0)) * w_scale
            wname = f"{wq}_fp32"
            g.initializer.append(numpy_helper.from_array(w.astype(np.float32), wname))
            # per-token: the next Mul applies the per-row activation scale
            mul = consumers[n.output[0]][0]
            replaced[id(mul)] = helper.make_node("MatMul", [x, wname], [mul.output[0]])
            removed.add(id(n))
        elif n.op_type == "Gather" and n.input[0] in inits and const(n.input[0]).dtype == np.int8:  # type: ignore[union-attr]
            # a per-token-id int8 table: Gather rows -> Cast -> Mul by the Gathered row scales
            cast = consumers[n.output[0]][0]
            mul = consumers[cast.output[0]][0]
            unsq = producer[next(i for i in mul.input if i != cast.output[0])]
            scale_gather = producer[unsq.input[0]]
            q, sc = const(n.input[0]), const(scale_gather.input[0])
            assert q is not None and sc is not None
            name = f"{n.input[0]}_fp32"
            g.initializer.append(numpy_helper.from_array((q.astype(np.float32) * sc[:, None]).astype(np.float32), name))
            replaced[id(mul)] = helper.make_node("Gather", [name, n.input[1]], [mul.output[0]], axis=0)
        elif n.op_type == "DequantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "Gather":
            gather = producer[n.input[0]]
            table, idx = gather.input
            q, s, zp = const(table), const(n.input[1]), const(n.input[2])
            assert q is not None and s is not None and zp is not None
            name = f"{table}_fp32"
            g.initializer.append(numpy_helper.from_array(((q.astype(np.float32) - zp) * s).astype(np.float32), name))
            replaced[id(gather)] = helper.make_node("Gather", [name, idx], [n.output[0]], axis=0)
            removed.add(id(n))
    nodes = [replaced.get(id(n), n) for n in g.node if id(n) not in removed]
    outputs = {o.name for o in g.output}
    while True:  # drop what no longer feeds an output
        used = outputs | {i for n in nodes for i in n.input}
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    save_rewritten(model, nodes, out)
    return out


def sample_rows(encoder: InputEncoder, policies: dict[str, Policy], data_dir: Path, n: int, seed: int = 1) -> list[Row]:
    """First windows of ``n`` prompts sampled evenly from every public file, each under a random policy."""
    rnd = random.Random(seed)
    texts: list[str] = []
    for f in sorted(Path(data_dir).glob("*.jsonl")):
        lines = [ln for ln in f.read_text(encoding="utf-8").split("\n") if ln.strip()]  # not splitlines: U+2028
        texts += [json.loads(ln)["text"] for ln in rnd.sample(lines, min(60, len(lines)))]
    rnd.shuffle(texts)
    rows = []
    for text in texts[:n]:
        pid = rnd.choice(sorted(policies))
        enc = encoder.encode(policies[pid], text)
        rows.append((pid, enc.input_ids[0], enc.attention_mask[0], enc.token_type_ids[0]))
    return rows


# Loaded as stored (no rewrite to the CPU's best sign), so the table shows the u8 x u8 kernel.
AS_STORED = "fused, per-token-w8 (kept uint8: u8 x u8 kernel)"


def session(path: Path, threads: int, spinning: bool, *, as_stored: bool = False) -> ort.InferenceSession:
    """A session as the service loader builds it (int8 weights in this CPU's best exact sign),
    or with ``as_stored`` the file's weights as they are."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    adapted = None if as_stored else adapt_weights(path, best_weight_sign())[0]
    return ort.InferenceSession(adapted or str(path), so, providers=["CPUExecutionProvider"])


def unsafe_probs(s: ort.InferenceSession, rows: list[Row]) -> np.ndarray:
    feeds = {
        "input_ids": pad_batch([r[1] for r in rows]),
        "attention_mask": pad_batch([r[2] for r in rows]),
        "token_type_ids": pad_batch([r[3] for r in rows]),
    }
    (logits,) = s.run(["logits"], feeds)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray((z / z.sum(axis=-1, keepdims=True))[:, 1])


@dataclass
class FormatResult:
    name: str
    nodes: int
    size_mb: float
    b1_ms: float = 0.0
    b8_per_s: float = 0.0
    b32_per_s: float = 0.0
    agreement: float = 0.0
    max_diff: float = 0.0
    mean_diff: float = 0.0
    batch_max_diff: float = 0.0
    batch_flips: int = 0


def time_formats(paths: dict[str, Path], threads: int, spinning: bool, seed: int = 0) -> dict[str, tuple[float, ...]]:
    """Median call time per shape, the formats interleaved call by call (so load drift hits all alike)."""
    rng = np.random.default_rng(seed)
    sessions = {k: session(p, threads, spinning, as_stored=k == AS_STORED) for k, p in paths.items()}
    out: dict[str, list[float]] = {k: [] for k in paths}
    for b, t, calls in SHAPES:
        ids = rng.integers(1000, 29000, (b, t)).astype(np.int64)
        ids[:, 0] = 101
        every = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        # A graph takes the feeds it declares: MPNet (the capacity trial's larger base) has no token types.
        feeds = {k: {n: every[n] for n in (i.name for i in s.get_inputs())} for k, s in sessions.items()}
        times: dict[str, list[float]] = {k: [] for k in paths}
        for k, s in sessions.items():
            s.run(None, feeds[k])
        for _ in range(calls):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t0)
        for k in paths:
            out[k].append(float(np.median(times[k])))
    return {k: tuple(v) for k, v in out.items()}


def study(
    model_dir: Path,
    work: Path,
    data_dir: Path,
    policies: dict[str, Policy],
    *,
    fp32: Path | None = None,
    rows: int = 600,
    threads: int = 0,
    spinning: bool = False,
) -> list[FormatResult]:
    """Every format of ``model_dir``'s weights: speed (interleaved), fidelity and batch invariance."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    reference = fp32 or dequantize(model_dir / manifest.files[0].path, work / "fp32.onnx")
    paths = {"served file (as shipped)": model_dir / manifest.files[0].path, "fp32 reference": reference}
    for q in QUANTIZATIONS:
        optimize_for_cpu(
            reference, work / f"{q}.onnx", work / f"work-{q}", num_heads=heads, hidden_size=hidden, quantization=q
        )
        paths[AS_STORED if q == "per-token-w8" else f"fused, {q}"] = work / f"{q}.onnx"
    encoder = InputEncoder.from_file(
        model_dir / manifest.tokenizer_file, manifest.input_template, manifest.max_length, manifest.stride
    )
    data = sample_rows(encoder, policies, data_dir, rows)
    cut = np.array([manifest.policies[r[0]].threshold if r[0] in manifest.policies else 0.5 for r in data])

    def verdicts(p: np.ndarray) -> np.ndarray:
        return np.asarray(apply_calibration(manifest.calibration, p)) >= cut

    threads = threads or os.cpu_count() or 1
    ref_session = session(reference, threads, spinning)
    ref = np.array([unsafe_probs(ref_session, [r])[0] for r in data])
    timings = time_formats(paths, threads, spinning)
    rnd = random.Random(5)
    results = []
    for name, path in paths.items():
        s = session(path, threads, spinning, as_stored=name == AS_STORED)
        alone = np.array([unsafe_probs(s, [r])[0] for r in data])
        mixed = np.empty(len(data))
        for i in range(len(data)):  # each row among 7 random others: other lengths, other padding
            batch = [*rnd.sample(range(len(data)), 7), i]
            rnd.shuffle(batch)
            mixed[i] = unsafe_probs(s, [data[j] for j in batch])[batch.index(i)]
        b1, b8, b32 = timings[name]
        results.append(
            FormatResult(
                name,
                count_nodes(path),
                path.stat().st_size / 1e6,
                b1 * 1e3,
                8 / b8,
                32 / b32,
                float(np.mean(verdicts(alone) == verdicts(ref))),
                float(np.abs(alone - ref).max()),
                float(np.abs(alone - ref).mean()),
                float(np.abs(alone - mixed).max()),
                int(np.sum(verdicts(alone) != verdicts(mixed))),
            )
        )
    return results


def markdown(results: list[FormatResult], rows: int, spinning: bool) -> str:
    head = (
        f"| format | nodes | MB | batch 1 x 48 tokens, ms | batch 8 x 128, seq/s | batch 32 x 80, seq/s "
        f"| verdicts = fp32 ({rows} rows) | max / mean abs diff | alone vs in a batch: max abs diff (verdict flips) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.name} | {r.nodes} | {r.size_mb:.1f} | {r.b1_ms:.2f} | {r.b8_per_s:.0f} | {r.b32_per_s:.0f} "
        f"| {100 * r.agreement:.2f} % | {r.max_diff:.3f} / {r.mean_diff:.4f} "
        f"| {r.batch_max_diff:.1e} ({r.batch_flips}) |"
        for r in results
    ]
    return head + "\n".join(lines) + f"\n\n(onnxruntime intra-op spinning {'on' if spinning else 'off'})\n"
