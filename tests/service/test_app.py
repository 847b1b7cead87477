"""App-level behaviour that a running server cannot easily be made to show (in-process ASGI)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from service.config import Settings
from service.http.app import create_app


def test_unexpected_exception_is_a_clean_500(tmp_path: Path) -> None:
    app = create_app(Settings(model_dir=tmp_path / "none", threads=1))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    async def main() -> tuple[httpx.Response, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/boom", headers={"x-request-id": "req-500"})
            return r, (await c.get("/metrics")).text

    r, metrics = asyncio.run(main())
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-500"
    body = r.json()
    assert body["error"]["code"] == "internal_error" and body["error"]["details"] == {"request_id": "req-500"}
    assert "secret" not in r.text and "Traceback" not in r.text
    assert 'uniguard_errors_total{code="internal_error"} 1.0' in metrics


def test_apps_do_not_share_metrics(tmp_path: Path) -> None:
    a = create_app(Settings(model_dir=tmp_path, threads=1))
    b = create_app(Settings(model_dir=tmp_path, threads=1))
    a.state.runtime.metrics.record_error("queue_full", rejected=True)
    assert b'uniguard_rejected_total{reason="queue_full"} 0.0' in b.state.runtime.metrics.render()  # exists from start
    assert b'uniguard_rejected_total{reason="queue_full"} 1.0' in a.state.runtime.metrics.render()
