"""What every command shares: the command line it records, option parsing, the stage record."""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from training.io import write_json_atomic

if TYPE_CHECKING:
    from training.release.optimize import Quantization

RUN_HELP = "Run name: outputs go to runs/<run>/."
# The folders every data-reading command takes, declared once (the defaults stay with each command).
DataDirOption = Annotated[Path, typer.Option(help="Folder of the public JSONL files (../shared/data).")]
ExamplesDirOption = Annotated[Path, typer.Option(help="Folder of hand-written example JSONL files.")]
PoliciesDirOption = Annotated[Path, typer.Option(help="Folder of policy YAML files.")]
THREADS_HELP = (
    "Torch threads (0: all cores). Use 1 when other jobs share the CPU: on a busy 2-core box "
    "2 oversubscribed OpenMP threads ran 5x slower than 1."
)

QUANTIZATION_HELP = (
    "Serving graph's int8 scheme: per-token (int8 weights), per-token-w8 (the same stored uint8; "
    "both score alike), dynamic (batch-dependent scores), none (fused fp32); empty: the project's default."
)


def parse_quantization(text: str) -> Quantization | None:
    """``--quantization`` as a ``Quantization`` (None when empty: the project's default)."""
    import typer

    from training.release.optimize import QUANTIZATIONS

    if not text:
        return None
    if text not in QUANTIZATIONS:
        raise typer.BadParameter(f"one of {', '.join(QUANTIZATIONS)}", param_hint="--quantization")
    return cast("Quantization", text)


def command_line() -> str:
    """This process's command as a user would type it (recorded in manifests and run records)."""
    return " ".join(["python -m training", *sys.argv[1:]])


def csv(values: str | list[str] | None) -> list[str]:
    """``a,b`` and repeated options alike: ``--methods ties --methods soup`` or ``--methods ties,soup``."""
    items = [values] if isinstance(values, str) else list(values or [])
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def record(run_dir: Path, stage: str, args: dict[str, Any], started: float) -> None:
    """Command, arguments and wall time of a stage, next to its outputs."""
    plain = {k: v for k, v in args.items() if not (callable(v) or inspect.ismodule(v))}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / f"{stage}.json",
        {
            "command": command_line(),
            "args": json.loads(json.dumps(plain, default=str)),
            "wall_seconds": round(time.time() - started, 1),
        },
    )


def defaults(command: Any) -> dict[str, Any]:
    """A typer command's option defaults, to call it from ``pipeline all`` with default settings."""
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()}


@contextmanager
def clean_exit(*errors: type[Exception]) -> Iterator[None]:
    """Known failures (a stage trained with other settings, ...) as one ``error:`` line and exit
    code 2, not a stack trace."""
    try:
        yield
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
