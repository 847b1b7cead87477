"""Int8 weights in the signedness this CPU multiplies fastest *and exactly*.

Why: onnxruntime's integer GEMM (MLAS) has two x86 kernels for uint8 activations. With signed
weights (u8 x s8) a CPU with VNNI (``avx512_vnni`` / ``avx_vnni``) accumulates in int32 and is
exact and fast; a CPU without VNNI (plain AVX2 / AVX-512BW) adds pairs of products in int16
(``vpmaddubsw``), which saturates for 8-bit weights (255 x 127 x 2 > 32767: a test graph scored
0.40 where fp32 said 0.32). With unsigned weights (u8 x u8) every x86 CPU widens to int16 first
and is exact, but 2.4x slower on a VNNI CPU (one 1024x384x1536 product, 2 threads, AMD EPYC
with AVX-512 VNNI: 2.3 ms against 5.6 ms).

Both encodings hold the same integers: ``w_s8 = w_u8 - 128`` with the weight zero point moving
from 128 to 0, so ``(x - 128)(w_u8 - 128) == (x - 128) w_s8`` term by term. The loader
therefore rewrites the weight initialisers of ``MatMulIntegerToFloat`` / ``MatMulInteger`` to
the form the CPU wants, and a model file scores bit-identically on every CPU, at the speed of
the best exact kernel. Training's scorer goes through the same loader, so the release's parity
gate measures what the service serves.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("uniguard.inference")

WeightSign = Literal["signed", "unsigned"]
WeightSetting = Literal["auto", "signed", "unsigned"]

# input index of (B, b_zero_point) per integer GEMM op
_WEIGHT_INPUTS = {"MatMulIntegerToFloat": (1, 5), "MatMulInteger": (1, 3)}
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}
# 7-bit signed weights (|w| <= 63) cannot saturate the int16 pair sum: they stay signed.
_SAFE_SIGNED_MAX = 63


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return set(value.split())
    return None


def best_weight_sign(machine: str | None = None, flags: set[str] | None = None) -> WeightSign:
    """``signed`` where u8 x s8 is exact (VNNI, or not x86), else ``unsigned``. An x86 CPU
    whose flags cannot be read is taken as one without VNNI: slower, never wrong."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return "signed"
    flags = cpu_flags() if flags is None else flags
    return "signed" if flags and flags & _VNNI_FLAGS else "unsigned"


def _needs(want: WeightSign, w: np.ndarray, zp: np.ndarray | None) -> bool:
    if want == "unsigned":
        return (
            w.dtype == np.int8
            and (zp is None or not zp.any())
            and int(np.abs(w.astype(np.int16)).max()) > _SAFE_SIGNED_MAX
        )
    return w.dtype == np.uint8 and zp is not None and zp.dtype == np.uint8 and bool((zp == 128).all())


def adapt_weights(model_path: Path, want: WeightSign) -> tuple[bytes | None, int]:
    """The model with its integer GEMM weights in ``want`` form, serialised, and the number of
    weights rewritten; ``(None, 0)`` when nothing needs rewriting (load the file as it is).
    A weight or zero point that anything else also reads is left alone (it keeps its meaning)."""
    model = onnx.load(str(model_path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    gemm_readers: dict[str, int] = {}
    candidates: list[tuple[onnx.NodeProto, str, str | None]] = []
    for node in g.node:
        idx = _WEIGHT_INPUTS.get(node.op_type)
        if idx is None or len(node.input) <= idx[0] or node.input[idx[0]] not in inits:
            continue
        w_name = node.input[idx[0]]
        zp_name = node.input[idx[1]] if len(node.input) > idx[1] and node.input[idx[1]] else None
        if zp_name is not None and zp_name not in inits:
            continue
        candidates.append((node, w_name, zp_name))
        for name in (w_name, zp_name):
            if name is not None:
                gemm_readers[name] = gemm_readers.get(name, 0) + 1
    new_zp: dict[str | None, str] = {}
    converted: set[str] = set()
    rewritten = 0
    for node, w_name, zp_name in candidates:
        if w_name not in converted:
            w = numpy_helper.to_array(inits[w_name])
            zp = numpy_helper.to_array(inits[zp_name]) if zp_name is not None else None
            if not _needs(want, w, zp) or readers[w_name] != gemm_readers[w_name]:
                continue
            shift = 128 if want == "unsigned" else -128
            w2 = (w.astype(np.int16) + shift).astype(np.uint8 if want == "unsigned" else np.int8)
            inits[w_name].CopyFrom(numpy_helper.from_array(w2, w_name))
            converted.add(w_name)
            rewritten += 1
        if zp_name not in new_zp:  # a zero point shared by many GEMMs gets one replacement
            shape = numpy_helper.to_array(inits[zp_name]).shape if zp_name is not None else ()
            zp2 = np.full(shape, 128, np.uint8) if want == "unsigned" else np.zeros(shape, np.int8)
            new_zp[zp_name] = f"{zp_name or 'b_zp'}/{want}"
            g.initializer.append(numpy_helper.from_array(zp2, new_zp[zp_name]))
        zp_index = _WEIGHT_INPUTS[node.op_type][1]
        while len(node.input) <= zp_index:
            node.input.append("")
        node.input[zp_index] = new_zp[zp_name]
    if not rewritten:
        return None, 0
    used = {i for n in g.node for i in n.input}
    unused_zps = {name for name in new_zp if name is not None and name not in used}
    kept = [i for i in g.initializer if i.name not in unused_zps]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model.SerializeToString(), rewritten


def resolve_weight_sign(setting: WeightSetting) -> WeightSign:
    """``auto`` -> what this CPU multiplies fastest and exactly (``best_weight_sign``)."""
    return best_weight_sign() if setting == "auto" else setting
