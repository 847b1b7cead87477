"""``python -m bench``: raw onnxruntime vs the service over HTTP, one table.

Every row's "% of limit" is against the limit: the best raw onnxruntime configuration
(batch size x spinning, swept) on the same model and the same mix of prompts.

python -m bench                                  # models/default; short and long mixes; 1/8/64 clients
python -m bench --model-dir /tmp/tiny --seconds 3 --concurrency 1,8
python -m bench --mix short --concurrency 1,64 --raw-batches 1,4,8,16
python -m bench --env UNIGUARD_MAX_WAIT_MS=2 --json runs/bench/result.json
python -m bench --mix short --concurrency 64 --routes classify,moderations,classify,moderations  # both routes
python -m bench --provider cuda --env UNIGUARD_MAX_WAIT_MS=2 --env UNIGUARD_MAX_PADDING=0.5   # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.serving import RAW_BATCHES, ROUTES, run
from bench.workload import MIXES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("UNIGUARD_MODEL_DIR", "models/default")))
    ap.add_argument(
        "--mix",
        default="short,long",
        help="comma-separated request mixes: short (5-60 words), long (every prompt up to --max-chars)",
    )
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per client count")
    ap.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="unmeasured time before each client count (and until every client had two answers)",
    )
    ap.add_argument(
        "--raw-seconds",
        type=float,
        default=3.0,
        help="measured time per raw onnxruntime configuration (batch size x spinning), at least 3 calls",
    )
    ap.add_argument(
        "--raw-batches",
        default=",".join(str(b) for b in RAW_BATCHES),
        help="raw batch sizes swept for the limit (the service's own batch sizes are added)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads, raw and service (default: CPU count)"
    )
    ap.add_argument("--requests", type=int, default=2000, help="distinct requests in the mix")
    ap.add_argument("--max-chars", type=int, default=2000, help="leave out longer prompts (0: keep all)")
    ap.add_argument(
        "--provider", choices=("auto", "cpu", "cuda"), default="auto", help="raw and service (cuda: the fp16 file)"
    )
    ap.add_argument(
        "--env", action="append", default=[], metavar="UNIGUARD_X=V", help="extra service setting (repeatable)"
    )
    ap.add_argument(
        "--routes",
        default="classify",
        help="comma-separated routes the service rows drive with the same requests: classify, moderations "
        "(repeat them to interleave runs: classify,moderations,classify,moderations)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the full report here")
    ap.add_argument("--log-dir", type=Path, default=None, help="service log folder (default runs/bench)")
    args = ap.parse_args(argv)
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("UNIGUARD_"):
            ap.error(f"--env wants UNIGUARD_NAME=value, got {item!r}")
        env[key] = value
    mixes = [m.strip() for m in args.mix.split(",") if m.strip()]
    if not mixes or any(m not in MIXES for m in mixes):
        ap.error(f"--mix wants some of {','.join(MIXES)}, got {args.mix!r}")
    try:
        raw_batches = [int(b) for b in args.raw_batches.split(",") if b.strip()]
    except ValueError:
        raw_batches = []
    if not raw_batches or min(raw_batches) < 1:
        ap.error(f"--raw-batches wants positive integers, got {args.raw_batches!r}")
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or any(r not in ROUTES for r in routes):
        ap.error(f"--routes wants some of {','.join(ROUTES)}, got {args.routes!r}")
    if not (args.model_dir / "manifest.json").is_file():
        ap.error(f"{args.model_dir} is not a model folder (no manifest.json)")
    report = run(
        args.model_dir,
        concurrency=tuple(int(c) for c in args.concurrency.split(",") if c.strip()),
        seconds=args.seconds,
        warmup=args.warmup,
        raw_seconds=args.raw_seconds,
        raw_batches=raw_batches,
        mixes=mixes,
        threads=args.threads,
        n_requests=args.requests,
        max_chars=args.max_chars or None,
        service_env=env,
        log_dir=args.log_dir,
        provider=args.provider,
        routes=routes,
    )
    m = report.machine
    print(
        f"machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, {m['threads']} intra-op threads; "
        f"python {m['python']}; model {args.model_dir} on {m['provider']}"
    )
    print(f"load average before/after: {m['load_average_before']} / {m['load_average_after']}")
    if m["other_busy_processes"]:
        print("NOISE: other busy processes during the run: " + "; ".join(m["other_busy_processes"]))
    print()
    print(report.markdown())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(report.to_json() + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
