"""Fuse, then quantise: the CPU serving graph of every model folder the project writes.

Why fuse first: optimum's export followed by dynamic quantisation leaves 700+ nodes
(MatMulInteger + DynamicQuantizeLinear + Mul/Cast chains, unfused attention and layer
norms). With onnxruntime's intra-op spinning off, which the service needs for its event
loop, every node pays a thread wake-up. onnxruntime's transformer optimiser fuses the
BERT graph into Attention, SkipLayerNormalization and BiasGelu (~50 nodes) first.

Why per-token int8 and not onnxruntime's dynamic quantisation: ``DynamicQuantizeLinear``
computes one activation scale over the whole batch tensor, padding included, so a prompt's
score moved with whatever else was in flight (0.967 alone, 0.884-0.952 next to one other
prompt on the shipped model). Here every MatMul's input is quantised row by row (one
scale per token, symmetric, uint8 around 128) against per-output-channel 8-bit weights
(-127..127), so a row's result depends on that row alone: scores are identical alone and
in any batch.
The word-embedding table is stored int8 with one scale per token id (a Gather of int8
rows, then dequantised), which keeps the file the size of the old one.

``quantization``: ``per-token`` (the default, batch-invariant; weights stored int8),
``per-token-w8`` (the same integers stored uint8 around 128), ``dynamic`` (onnxruntime's
per-tensor dynamic int8 on the fused graph: fastest, but batch-dependent scores), ``none``
(fused fp32). The two per-token files score bit-identically: the loader
(``service.int8_weights``) rewrites either to the signedness the serving CPU multiplies
exactly and fastest (int8 with VNNI, where u8 x s8 is exact and 2.4x faster than u8 x u8;
uint8 on x86 CPUs without VNNI, whose u8 x s8 kernel saturates int16 pair sums).
"""

from __future__ import annotations

import collections
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

Quantization = Literal["per-token", "per-token-w8", "dynamic", "none"]
QUANTIZATIONS: tuple[Quantization, ...] = ("per-token", "per-token-w8", "dynamic", "none")
# MatMuls with fewer output columns stay fp32 (the 2-logit classifier: cheap, and its
# rounding would land directly on the score).
MIN_QUANTIZED_COLUMNS = 16
# Embedding tables with at least this many rows are stored int8 (the word embeddings: 30522
# x 384 for MiniLM, 47 MB in fp32); position and token-type tables stay fp32.
MIN_QUANTIZED_TABLE_ROWS = 1024
# What every model folder the project writes is served with (the release, merge winners,
# pipeline exports); ``--quantization`` on ``train default`` and ``export`` overrides it.
DEFAULT_QUANTIZATION: Quantization = "per-token"
PRECISION = {"per-token": "int8", "per-token-w8": "int8", "dynamic": "int8", "none": "fp32"}


@dataclass(frozen=True)
class OptimizeReport:
    """What the serving graph is; recorded in the manifest (``training.optimization``)."""

    quantization: str
    fused: dict[str, int]  # fused operator -> count, as the optimiser reports it
    nodes_exported: int
    nodes_served: int
    quantized_matmuls: int = 0
    activation_scales: str = ""
    weight_scales: str = ""
    optimizer: str = "onnxruntime.transformers.optimizer (model_type=bert, opt_level=0)"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def model_dims(config_json: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) from a transformers ``config.json``: what the fusions need."""
    cfg = json.loads(Path(config_json).read_text(encoding="utf-8"))
    return int(cfg["num_attention_heads"]), int(cfg["hidden_size"])


def fuse(fp32_model: Path, out: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse attention, layer norms and GELU offline (python fusions, provider-independent).

    The embedding layer norm is left unfused on purpose: ``EmbedLayerNormalization`` wants
    an fp32 word-embedding table (47 MB for MiniLM), while a plain Gather can read int8 rows.
    """
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    model = optimize_model(
        str(fp32_model),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(out))
    return stats


class _Builder:
    """Adds constants and nodes to a graph under unique names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self._count = collections.Counter[str]()
        # names already in the graph (a graph dequantised from an earlier rewrite keeps some)
        self._taken = set(self.initializers) | {o for n in graph.node for o in n.output}

    def name(self, stem: str) -> str:
        while True:
            self._count[stem] += 1
            name = f"uniguard_pt/{stem}_{self._count[stem]}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None and len(init.dims) == 2 else None


# 8-bit symmetric weights. (7 bits, -63..63, were used for a while so that x86 CPUs without
# VNNI could not saturate their int16 pair sums; it cost verdicts, 98.6 % against 99.6 % equal
# to fp32 on one checkpoint. The loader now picks a kernel that is exact on the CPU instead.)
WEIGHT_QMAX = 127.0


def _quantize_weight(w: np.ndarray, *, unsigned: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output column: (int8 [K, N], float32 scale [N]); with ``unsigned`` the
    same integers stored as uint8 around 128."""
    qmax = np.float32(WEIGHT_QMAX)
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12).astype(np.float32) / qmax
    q = np.clip(np.round(w / scale), -qmax, qmax)
    if unsigned:
        return (q + 128).astype(np.uint8), scale
    return q.astype(np.int8), scale


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def _quantized_gather(b: _Builder, node: onnx.NodeProto, table: np.ndarray, axis_last: str) -> list[onnx.NodeProto]:
    """An embedding lookup on an int8 table with one scale per row (per token id): only the
    looked-up rows are dequantised, so the table costs a quarter of fp32 on disk and in memory."""
    scale = np.maximum(np.abs(table).max(axis=1), 1e-12).astype(np.float32) / np.float32(127.0)
    q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    q_name, s_name = b.const("table_q", q), b.const("table_scale", scale)
    rows, rows_f, sc, sc2 = (b.name(s) for s in ("rows", "rows_f", "row_scale", "row_scale2"))
    ids = node.input[1]
    return [
        helper.make_node("Gather", [q_name, ids], [rows], axis=0),
        helper.make_node("Cast", [rows], [rows_f], to=TensorProto.FLOAT),
        helper.make_node("Gather", [s_name, ids], [sc], axis=0),
        helper.make_node("Unsqueeze", [sc, axis_last], [sc2]),
        helper.make_node("Mul", [rows_f, sc2], [node.output[0]]),
    ]


def quantize_per_token(model_path: Path, out: Path, *, unsigned_weights: bool = False) -> int:
    """Replace every weight MatMul (Y = X W) by per-token int8: for X viewed as [M, K],
    scale_m = max|X[m, :]| / 127, Xq = round(X / scale_m) + 128 (uint8),
    Y = (Xq - 128) Wq * scale_m * w_scale_n. Returns the number of MatMuls rewritten.
    ``unsigned_weights``: Wq is 8-bit uint8 around 128 (see ``per-token-w8``)."""
    model = onnx.load(str(model_path))
    g = model.graph
    b = _Builder(g)
    inv127 = b.const("inv127", np.array(1.0 / 127.0, np.float32))
    eps = b.const("eps", np.array(1e-10, np.float32))
    axis1 = b.const("axis1", np.array([1], np.int64))
    a_zp = b.const("a_zp", np.array(128, np.uint8))
    b_zp = b.const("b_zp", np.array([128], np.uint8) if unsigned_weights else np.zeros(1, np.int8))
    zero = b.const("zero", np.array(0.0, np.float32))
    one = b.const("one", np.array(1.0, np.float32))
    start0 = b.const("start0", np.array([0], np.int64))
    end_m1 = b.const("end_m1", np.array([-1], np.int64))
    axis_last = b.const("axis_last", np.array([-1], np.int64))
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # X -> (Xq, scale [M, 1], leading shape)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in g.node:
        table = b.weight(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and table.shape[0] >= MIN_QUANTIZED_TABLE_ROWS and _gather_axis(node) == 0:
            nodes += _quantized_gather(b, node, table.astype(np.float32), axis_last)
            continue
        w = b.weight(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or w.shape[1] < MIN_QUANTIZED_COLUMNS:
            nodes.append(node)
            continue
        k, n = w.shape
        x = node.input[0]
        if x not in quantized_inputs:
            flat, absx, amax, sc0, sc, z0, z1, zpv, xq, sc2, shp, lead = (
                b.name(s) for s in ("x2d", "abs", "amax", "sc0", "sc", "z0", "z1", "zp", "xq", "sc2", "shape", "lead")
            )
            flat_shape = b.const("flat", np.array([-1, k], np.int64))
            nodes += [
                helper.make_node("Shape", [x], [shp]),
                helper.make_node("Slice", [shp, start0, end_m1], [lead]),
                helper.make_node("Reshape", [x, flat_shape], [flat]),
                helper.make_node("Abs", [flat], [absx]),
                helper.make_node("ReduceMax", [absx, axis1], [amax], keepdims=0),
                helper.make_node("Mul", [amax, inv127], [sc0]),
                helper.make_node("Max", [sc0, eps], [sc]),
                # a [M] vector of 128s (QuantizeLinear's per-axis zero point has the scale's shape)
                helper.make_node("Mul", [sc, zero], [z0]),
                helper.make_node("Cast", [z0], [z1], to=TensorProto.UINT8),
                helper.make_node("Add", [z1, a_zp], [zpv]),
                helper.make_node("QuantizeLinear", [flat, sc, zpv], [xq], axis=0),
                helper.make_node("Unsqueeze", [sc, axis1], [sc2]),
            ]
            quantized_inputs[x] = (xq, sc2, lead)
        xq, sc2, lead = quantized_inputs[x]
        wq, w_scale = _quantize_weight(w.astype(np.float32), unsigned=unsigned_weights)
        wq_name, ws_name = b.const("wq", wq), b.const("w_scale", w_scale)
        yw, y2d, out_shape = (b.name(s) for s in ("yw", "y2d", "out_shape"))
        n_const = b.const("n", np.array([n], np.int64))
        nodes += [
            # (Xq - 128) Wq * w_scale in one kernel (int32 accumulators never leave the GEMM)
            helper.make_node(
                "MatMulIntegerToFloat", [xq, wq_name, one, ws_name, a_zp, b_zp], [yw], domain="com.microsoft"
            ),
            helper.make_node("Mul", [yw, sc2], [y2d]),
            helper.make_node("Concat", [lead, n_const], [out_shape], axis=0),
            helper.make_node("Reshape", [y2d, out_shape], [node.output[0]]),
        ]
        rewritten += 1
    save_rewritten(model, nodes, out)
    return rewritten


def save_rewritten(model: onnx.ModelProto, nodes: list[onnx.NodeProto], out: Path) -> None:
    """Give ``model`` the rewritten ``nodes``, drop initializers nothing reads any more, check and save."""
    g = model.graph
    g.ClearField("node")
    g.node.extend(nodes)
    used = {i for nd in nodes for i in nd.input}
    kept = [i for i in g.initializer if i.name in used]
    g.ClearField("initializer")
    g.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def count_nodes(model_path: Path) -> int:
    return len(onnx.load(str(model_path), load_external_data=False).graph.node)


def optimize_for_cpu(
    fp32_model: Path,
    out: Path,
    work_dir: Path,
    *,
    num_heads: int,
    hidden_size: int,
    quantization: Quantization = DEFAULT_QUANTIZATION,
) -> OptimizeReport:
    """fp32 export -> fused -> quantised ``out``; intermediate files go to ``work_dir``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fused_path = work_dir / "fused.onnx"
    fused = fuse(fp32_model, fused_path, num_heads=num_heads, hidden_size=hidden_size)
    matmuls, act, wts = 0, "", ""
    if quantization == "none":
        Path(out).write_bytes(fused_path.read_bytes())
    elif quantization == "dynamic":
        quantize_dynamic(
            str(fused_path),
            str(out),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
        act, wts = "per batch tensor (dynamic; depends on batch-mates)", "per tensor"
    else:
        w8 = quantization == "per-token-w8"
        matmuls = quantize_per_token(fused_path, Path(out), unsigned_weights=w8)
        act = "per token (row of the batch), symmetric"
        wts = "per output channel, symmetric, 8-bit, stored " + ("uint8 around 128" if w8 else "int8")
    return OptimizeReport(
        quantization=quantization,
        fused=fused,
        nodes_exported=count_nodes(fp32_model),
        nodes_served=count_nodes(Path(out)),
        quantized_matmuls=matmuls,
        activation_scales=act,
        weight_scales=wts,
    )
