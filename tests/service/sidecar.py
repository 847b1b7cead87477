"""Helpers for the gateway-sidecar tests: tiny models with forced verdicts, servers in parallel.

The tiny model has random weights, so verdicts are forced through the manifest thresholds
(the manifest hash check covers model.onnx only): threshold 0.0 makes every prompt unsafe
under that policy, 1.0 makes every prompt safe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.harness.live_server import Server, serve

UNSAFE, SAFE = 0.0, 1.0
# prompt_injection always safe, toxicity always unsafe, every other policy safe.
MIXED = {"prompt_injection": SAFE, "toxicity": UNSAFE}


def model_with_thresholds(src: Path, dst: Path, thresholds: Mapping[str, float], default: float = SAFE) -> Path:
    """A copy of the model folder ``src`` whose policy thresholds are forced."""
    shutil.copytree(src, dst)
    manifest_path = dst / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["default_threshold"] = default
    for pid, entry in manifest["policies"].items():
        entry["threshold"] = thresholds.get(pid, default)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return dst


@contextmanager
def servers(
    log_dir: Path, specs: Mapping[str, Mapping[str, str]], ready: Mapping[str, bool] | None = None
) -> Iterator[dict[str, Server]]:
    """Start every spec's server at once (name -> UNIGUARD_* env), then wait for each one:
    /readyz 200, or /healthz 200 where ``ready[name]`` is False (a model that cannot load)."""
    ready = ready or {}
    with ExitStack() as stack:
        out = {name: stack.enter_context(serve(log_dir / f"{name}.log", **env)) for name, env in specs.items()}
        for name, server in out.items():
            server.wait("/readyz" if ready.get(name, True) else "/healthz", 200)
        yield out


def sse_events(body: bytes) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    return [line[len("data: ") :] for line in body.decode().split("\n") if line.startswith("data: ")]


def chat(content: str = "hello there", *, stream: bool = False, **extra: object) -> dict:
    body: dict = {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}
    if stream:
        body["stream"] = True
    return body


def post_json(client: httpx.Client, path: str, obj: object, **kw: Any) -> httpx.Response:
    return client.post(
        path,
        content=json.dumps(obj).encode(),
        headers={"content-type": "application/json", **kw.pop("headers", {})},
        **kw,
    )
