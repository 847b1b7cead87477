"""How much later each streamed chunk reaches the client with UNIGUARD_MODERATE_STREAM on.

    python -m bench.stream_latency [--model models/default | tiny] [--streams 5] [--delay 0.02]

Starts the tests' fake upstream (tests/harness/upstream.py) in this process and the service
(``python -m service``, one thread) once per configuration; streams the same answer word by
word, one event every ``--delay`` seconds (50 events/s: a fast LLM), and times every event
from the upstream's send to the client's receipt (one clock: both ends are in this process).
``tiny`` builds the tests' tiny random model (every verdict forced safe). Prints the
per-event delay (p50 / p95 / max), the delay of the last event (the final check), and the
checks per stream, for moderation off and on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from service.gateway.stream_moderation import split_events
from tests.harness.live_server import serve
from tests.harness.upstream import UpstreamServer

ANSWER = (
    "Paris is the capital of France and its largest city. It lies on the river Seine in the north of the "
    "country. The city is known for the Eiffel Tower, the Louvre, Notre-Dame and its many cafes, parks and "
    "bridges. About two million people live in the city itself and more than twelve million in the wider "
    "region. Paris is a centre of art, fashion, science and government, and millions of visitors come every "
    "year to see its museums, to walk along the river and to eat in its restaurants."
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def one_stream(url: str, upstream: UpstreamServer, delay: float) -> tuple[list[float], float]:
    """Per-event delays (s) of one stream, and the number of events."""
    upstream.clear()
    arrivals: list[float] = []
    buffer = b""
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about Paris."}], "stream": True}
    headers = {"x-upstream-answer": ANSWER, "x-upstream-chunk-delay": str(delay)}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        for data in r.iter_raw():
            now = time.monotonic()
            events, buffer = split_events(buffer + data)
            arrivals += [now] * len(events)
    (record,) = upstream.records
    sent = [t for t, chunk in record.sent if chunk]
    assert len(sent) == len(arrivals), (len(sent), len(arrivals))
    return [a - s for a, s in zip(arrivals, sent, strict=True)], len(sent)


def checks_done(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("uniguard_gateway_judgements_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(model: Path, streams: int, delay: float, label: str, env: dict[str, str]) -> str:
    with (
        tempfile.TemporaryDirectory() as tmp,
        UpstreamServer() as upstream,
        serve(
            Path(tmp) / "server.log",
            UNIGUARD_MODEL_DIR=str(model),
            UNIGUARD_UPSTREAM_BASE_URL=upstream.base_url,
            UNIGUARD_OUTPUT_POLICIES="toxicity",
            **env,
        ) as server,
    ):
        server.wait("/readyz", 200)
        one_stream(server.url, upstream, delay)  # warm: connections, first model calls
        before = checks_done(server.url)
        delays: list[float] = []
        last: list[float] = []
        for _ in range(streams):
            d, _ = one_stream(server.url, upstream, delay)
            delays += d[:-1]
            last.append(d[-1])
        # one judgement of the prompt per stream; the rest are checks of the answer
        checks = (checks_done(server.url) - before) / streams - 1
    q = statistics.quantiles(delays, n=20)
    return (
        f"| {label} | {1000 * statistics.median(delays):.1f} | {1000 * q[18]:.1f} | {1000 * max(delays):.1f} "
        f"| {1000 * statistics.median(last):.1f} | {checks:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/default", help="a model folder, or tiny")
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model)
    if args.model == "tiny":
        from tests.conftest import TINY_MAX_LENGTH, TINY_STRIDE
        from tests.service.sidecar import model_with_thresholds
        from tests.tiny import build_tiny_model_folder

        built = build_tiny_model_folder(Path(tmp.name) / "tiny", max_length=TINY_MAX_LENGTH, stride=TINY_STRIDE)
        model = model_with_thresholds(built, Path(tmp.name) / "tiny-safe", {})
    words = len(ANSWER.split())
    print(f"{cpu_name()}; model {args.model}; {words} events of one word, {len(ANSWER)} characters, ")
    print(f"one every {args.delay * 1000:.0f} ms; {args.streams} streams per row; service threads 1\n")
    print("| moderation | p50 ms | p95 ms | max ms | last event ms | checks/stream |")
    print("|---|---:|---:|---:|---:|---:|")
    configs = [
        ("off", {}),
        ("on, defaults (every 200, hold back 100)", {"UNIGUARD_MODERATE_STREAM": "true"}),
        (
            "on, every 50, hold back 0",
            {
                "UNIGUARD_MODERATE_STREAM": "true",
                "UNIGUARD_STREAM_CHECK_EVERY_CHARS": "50",
                "UNIGUARD_STREAM_HOLDBACK_CHARS": "0",
            },
        ),
    ]
    for label, env in configs:
        print(measure(model, args.streams, args.delay, label, env), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
