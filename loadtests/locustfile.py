"""Load test: a realistic mix of policies, routes and prompt lengths from the shipped public data.

    pip install -e ".[bench]"     # locust
    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s \\
        --host http://127.0.0.1:8000 --csv runs/locust/uniguard --csv-full-history --only-summary

writes runs/locust/uniguard_stats.csv (per route: requests, failures, p50..p99.99, req/s),
_stats_history.csv, _failures.csv and _exceptions.csv. Prompts are sampled from
../shared/data (override with UNIGUARD_LOADTEST_DATA; a built-in spread of lengths if absent),
an equal share from every file, so lengths follow a guardrail's traffic: mostly short
questions, some multi-window jailbreak prompts. UNIGUARD_API_KEY, if set, is sent.

A 429 queue_full or 504 deadline_exceeded counts as a failure (the service shed load); the
run's exit code is then non-zero (``--exit-code-on-error`` is locust's default of 1).
"""

from __future__ import annotations

import os
import random
import sys
from argparse import ArgumentParser
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: bench.workload

from bench.workload import POLICIES, load_prompts

PROMPTS = load_prompts()
INLINE_POLICY = {
    "id": "no_medical",
    "name": "No medical advice",
    "description": "Block prompts asking for a diagnosis or which medicine and dose the asker should take.",
}
TIMING_HEADERS = ("x-queue-time", "x-inference-time", "x-total-time")


@events.init_command_line_parser.add_listener
def _(parser: ArgumentParser) -> None:
    parser.add_argument("--max-prompt-chars", type=int, default=0, help="leave out longer prompts (0: all)")


class GuardUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        key = os.environ.get("UNIGUARD_API_KEY")
        if key:
            self.client.headers["x-api-key"] = key
        limit = (
            getattr(self.environment.parsed_options, "max_prompt_chars", 0) if self.environment.parsed_options else 0
        )
        self.prompts = [p for p in PROMPTS if not limit or len(p) <= limit] or PROMPTS

    def _classify(self, body: dict, name: str) -> None:
        with self.client.post("/v1/classify", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code} {r.text[:200]}")
            elif not all(h in r.headers for h in TIMING_HEADERS):
                r.failure("timing headers missing")

    @task(14)
    def one_policy(self) -> None:
        self._classify(
            {"policy_id": random.choice(POLICIES), "prompt": random.choice(self.prompts)}, "/v1/classify [1 policy]"
        )

    @task(3)
    def all_policies(self) -> None:
        self._classify(
            {"policy_id": list(POLICIES), "prompt": random.choice(self.prompts)}, "/v1/classify [5 policies]"
        )

    @task(1)
    def inline_policy(self) -> None:
        self._classify({"policy": INLINE_POLICY, "prompt": random.choice(self.prompts)}, "/v1/classify [inline policy]")

    @task(2)
    def litellm_guardrail(self) -> None:
        body = {"texts": [random.choice(self.prompts)], "input_type": "request", "litellm_call_id": "locust"}
        with self.client.post(
            "/beta/litellm_basic_guardrail_api",
            json=body,
            name="/beta/litellm_basic_guardrail_api",
            catch_response=True,
        ) as r:
            if r.status_code != 200 or r.json().get("action") not in ("BLOCKED", "NONE"):
                r.failure(f"{r.status_code} {r.text[:200]}")
