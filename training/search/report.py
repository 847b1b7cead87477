"""The search's closing table: each method × strategy at iteration 1 vs best after N.

Iteration 1 of a strategy is its first, uninformed proposal; the gap to the best after N
is what the search bought. The best single source is the bar a merge has to clear.
"""

from __future__ import annotations

from typing import Any

from training.search.run import SearchResult
from training.ui import print_table

COLUMNS = ["method", "strategy", "F1 @ iter 1", "best F1", "gain", "best @ iter", "type", "vs best single"]


def table_rows(result: SearchResult) -> list[list[Any]]:
    _, single_f1 = result.best_single
    rows = []
    for (method, strategy), trials in result.trials.items():
        if not trials:
            continue
        first = trials[0]
        best = max(trials, key=lambda t: (t["f1"], -t["iteration"]))
        rows.append(
            [
                method,
                strategy,
                first["f1"],
                best["f1"],
                best["f1"] - first["f1"],
                best["iteration"] + 1,
                best.get("type"),
                best["f1"] - single_f1,
            ]
        )
    return rows


def fmt_row(row: list[Any]) -> list[str]:
    method, strategy, first, best, gain, at, typ, vs = row
    return [method, strategy, f"{first:.4f}", f"{best:.4f}", f"{gain:+.4f}", str(at), str(typ), f"{vs:+.4f}"]


def markdown(result: SearchResult, iterations: int) -> str:
    name, f1 = result.best_single
    win = result.winner
    lines = [
        f"Validation F1 (mean over policies, per-policy calibrated threshold) of the merged model, "
        f"{iterations} iterations per method × strategy, top-{len(result.top)} sources: "
        + ", ".join(f"{s.name} ({result.singles[s.name]['f1']:.4f})" for s in result.top)
        + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt_row(r)) + " |" for r in table_rows(result)]
    verdict = "beats" if win["f1"] > f1 else "does not beat"
    lines += [
        "",
        f"Best single checkpoint: {name} F1 {f1:.4f}. Best merge: {win['method']} × {win['strategy']} "
        f"(type {win['type']}, iteration {win['iteration'] + 1}) F1 {win['f1']:.4f}: UniGuard {verdict} "
        f"the best single checkpoint ({win['f1'] - f1:+.4f}).",
    ]
    return "\n".join(lines) + "\n"


def print_summary(result: SearchResult) -> None:
    """The closing table on the console, gains over the best single checkpoint in green."""
    name, f1 = result.best_single
    rows = []
    for r in table_rows(result):
        cells = fmt_row(r)
        if r[-1] > 0:
            cells[-1] = f"[green]{cells[-1]}"
        rows.append(cells)
    print_table(
        f"Model merging search: F1 at iteration 1 vs best (best single: {name} {f1:.4f})",
        COLUMNS,
        rows,
        left=("method", "strategy", "type"),
    )
