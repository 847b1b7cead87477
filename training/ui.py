"""Console output: one stderr console, one progress-bar style, one table printer.

Training commands run for minutes on a terminal and for hours in logs; a bar that also
prints a line every few steps when stderr is not a terminal serves both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# In logs (stderr not a terminal) a wide console keeps whole tables on one line each.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
Update = Callable[..., None]  # update(done, total, info="")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def cell(value: object) -> str:
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[str] | None = None
) -> None:
    """Floats with 3 decimals, None as a dash; ``left`` names the left-aligned columns (all by default)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if left is None or c in left else "right")
    for r in rows:
        table.add_row(*[cell(v) for v in r])
    console.print(table)


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
        with progress_bar() as bar:
            tid = bar.add_task(description, total=None, info="")

            def update(done: int, total: int, info: str = "") -> None:
                bar.update(tid, completed=done, total=total, info=info)
                if not console.is_terminal and (done % self.every == 0 or done == total):
                    console.print(f"{description} {done}/{total} {info}")  # logs without a live bar

            yield update

    def print(self, *objects: Any) -> None:
        if self.enabled:
            console.print(*objects)
