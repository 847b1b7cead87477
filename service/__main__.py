"""``python -m service`` / ``uniguard-serve``: serve the app with uvicorn on Settings.host:port."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from service.config import Settings
from service.http.app import create_app
from service.http.read_timeouts import http_protocol
from service.http.server import GracefulServer
from service.logs import configure_logging


def main() -> None:
    configure_logging()
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"uniguard: invalid UNIGUARD_* setting:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=http_protocol(settings.header_timeout_s),  # slow-header clients get 408 and are cut off
        log_config=None,  # keep our JSON logging
        access_log=False,  # RequestContextMiddleware writes the access log
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,  # in-flight requests finish first
    )
    # SIGTERM: readiness off, drain, stop accepting, finish in-flight work; SIGHUP: hot reload.
    GracefulServer(config, app.state.runtime, drain_s=settings.shutdown_drain_s).run()


if __name__ == "__main__":
    main()
