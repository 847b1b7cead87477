"""The recipe's test-half comparison: the base, every source and the merge, per policy, at ``balanced``.

Each candidate is scored with torch (fp32) on the held-out rows of the binding sources (the
non-binding ones count in no score or threshold), thresholds chosen on validation + tune rows
by the protocol's ``balanced`` rule (``bounded_thresholds``), figures on the test half. Rows per
cell and windows per row are capped (a CPU budget), so these figures rank candidates; the
served file's own figures (int8, every row and window, the benign-prefix sweep) are the release
step's. A policy counts as worse only beyond the noise of its cells (binomial, both models).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from service.contract.policy import InputTemplate
from training.data.heldout import half_of
from training.data.rows import Example
from training.eval.heldout import HeldoutResult, binding, capped_heldout, heldout_result
from training.search.objective import OutOfSourceSet, ValidationSet

Loader = Callable[[], None]


def comparison_sets(
    search: OutOfSourceSet, heldout: list[Example], per_cell: int, max_windows: int
) -> tuple[OutOfSourceSet, ValidationSet]:
    """(validation + tune rows, test rows), binding sources only, at most ``per_cell`` rows a cell."""
    rows = capped_heldout([ex for ex in heldout if binding(ex) and ex.policy_id in search.by_policy], per_cell)
    tune = [ex for ex in rows if half_of(ex.text) == "tune"]
    test = [ex for ex in rows if half_of(ex.text) == "test"]
    val = search.examples[: search.n_validation]
    args = (search.policies, search.tokenizer_json, search.max_length, search.stride, max_windows)
    return OutOfSourceSet(val + tune, *args, n_validation=len(val)), ValidationSet(test, *args)


def score_candidates(
    candidates: dict[str, tuple[InputTemplate, Loader]],
    model: Any,
    tune: OutOfSourceSet,
    test: ValidationSet,
    progress: Callable[[str], None] | None = None,
) -> dict[str, HeldoutResult]:
    """Each candidate (label → template, a loader that puts its weights into ``model``) on the test half."""
    out: dict[str, HeldoutResult] = {}
    for label, (template, load) in candidates.items():
        load()
        thresholds = tune.thresholds(tune.score(model, template))
        out[label] = heldout_result(test.examples, test.score(model, template), thresholds)
        if progress is not None:
            progress(f"{label}: summary {out[label].summary:.4f}")
    return out


def policy_se(result: HeldoutResult, pid: str) -> float:
    """Standard error of a policy's balanced score from its binding cells (binomial, cells independent)."""
    cells = [c for c in result.cells if c["policy"] == pid and c.get("binding", True)]
    unsafe = [c for c in cells if c["label"] == 1]
    benign = [c for c in cells if c["label"] == 0]

    def var(group: list[dict[str, Any]], key: str) -> float:
        if not group:
            return 0.0
        return float(sum(c[key] * (1 - c[key]) / c["n"] for c in group)) / len(group) ** 2

    return 0.5 * math.sqrt(var(unsafe, "recall") + var(benign, "fpr"))


def worse_policies(merged: HeldoutResult, base: HeldoutResult, z: float = 2.0) -> dict[str, float]:
    """Policies where the merge's balanced score is below the base's by more than ``z`` standard errors
    of the difference (policy → the drop)."""
    out = {}
    for pid, m in merged.policies.items():
        b = base.policies.get(pid)
        if b is None:
            continue
        noise = z * math.hypot(policy_se(merged, pid), policy_se(base, pid))
        drop = b["balanced"] - m["balanced"]
        if drop > noise:
            out[pid] = round(drop, 4)
    return out


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def policy_comparison(results: dict[str, HeldoutResult], base: str | None = None) -> str:
    """Markdown: per policy and candidate, balanced score (± 2 s.e.), recall, pooled benign FPR, ROC-AUC,
    and the change against ``base``; then each candidate's summary."""
    lines = [
        "| policy | model | balanced (± 2 s.e.) | Δ vs base | recall % | pooled FPR % | ROC-AUC | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pids = sorted({pid for r in results.values() for pid in r.policies})
    for pid in pids:
        for label, r in results.items():
            p = r.policies.get(pid)
            if p is None:
                continue
            ref = results[base].policies.get(pid) if base else None
            delta = "–" if ref is None or label == base else f"{p['balanced'] - ref['balanced']:+.4f}"
            auc = "–" if p["roc_auc"] is None else f"{p['roc_auc']:.4f}"
            lines.append(
                f"| {pid} | {label} | {p['balanced']:.4f} ± {2 * policy_se(r, pid):.3f} | {delta} | "
                f"{_pct(p['recall'])} | {_pct(p['pooled_fpr'])} | {auc} | {p['threshold']:.4f} |"
            )
    lines.append("")
    lines.append("| model | summary (mean balanced over policies) |")
    lines.append("|---|---|")
    lines += [f"| {label} | **{r.summary:.4f}** |" for label, r in results.items()]
    return "\n".join(lines) + "\n"
