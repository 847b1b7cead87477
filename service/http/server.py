"""uvicorn with the service's signal contract.

* SIGTERM (orchestrators, ``docker stop``): readiness turns false at once (/readyz 503
  ``shutting down``) while requests are still served for ``shutdown_drain_s``, so load
  balancers stop sending; then uvicorn's graceful shutdown: stop accepting connections,
  let every request already received finish (queued and in-flight alike, bounded by
  ``request_timeout_s + 1``), then the lifespan shutdown drains the batcher. A second
  SIGTERM skips the rest of the drain.
* SIGINT (Ctrl-C): the same without the drain delay; a second one forces exit.
* SIGHUP: hot reload of model and policies (``Runtime.reload``), the process keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Generator
from types import FrameType

import uvicorn

from service.core.runtime import Runtime

log = logging.getLogger("uniguard.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_s = drain_s
        self._drain_deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            with super().capture_signals():
                yield
            return
        self._loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGHUP, self._handle_hup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _handle_hup(self, sig: int, frame: FrameType | None) -> None:
        # Runs between bytecodes on the loop's thread; schedule the reload on the loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading model and policies")
        self.runtime.request_reload("sighup")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and self._drain_deadline is None and not self.should_exit:
            self._captured_signals.append(sig)
            self.runtime.begin_drain()
            self._drain_deadline = time.monotonic() + self.drain_s
            log.info("SIGTERM: draining before shutdown", extra={"fields": {"drain_s": self.drain_s}})
            return
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.runtime.begin_drain()
        if sig == signal.SIGTERM and self._drain_deadline is not None and not self.should_exit:
            self.should_exit = True  # second SIGTERM: stop draining now
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)
