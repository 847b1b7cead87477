"""What one running app holds (settings, metrics, engine) and how it starts and stops.

Loading happens in a background task so the process answers /healthz at once and stays
up (not ready, with the reason) when the model cannot be loaded: an orchestrator then
sees a clear readiness error instead of a crash loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from service.batching import MicroBatcher
from service.config import Settings
from service.engine import Engine
from service.errors import REJECTION_CODES, ErrorCode
from service.inference import ModelLoadError, OnnxModel
from service.metrics import Metrics
from service.policy import load_policies

log = logging.getLogger("uniguard.runtime")


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    # Why the service is not ready; None once ready.
    not_ready_reason: str | None = "model is loading"
    _loader: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.not_ready_reason is None

    def record_error(self, code: ErrorCode) -> None:
        self.metrics.record_error(code.value, rejected=code in REJECTION_CODES)

    async def load(self) -> None:
        """Policies, model, batcher, warm-up; on any failure record why and stay not ready."""
        s = self.settings
        batcher: MicroBatcher | None = None
        try:
            policies = load_policies(s.policies_dir)
            if not policies:
                raise ValueError(f"no *.yaml policies in {s.policies_dir}")
            model = await asyncio.to_thread(OnnxModel.load, s.model_dir, s.threads)
            batcher = MicroBatcher(
                model.run,
                max_batch_size=s.max_batch_size,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                pad_id=model.pad_id,
                observer=self.metrics,
            )
            await batcher.start()
            engine = Engine(model, batcher, policies, s, self.metrics)
            await engine.warm_up()
        except Exception as exc:
            if batcher is not None:
                await batcher.stop(timeout=1.0)
            self.not_ready_reason = f"model not loaded: {exc}"
            log.error("not ready", extra={"fields": {"reason": self.not_ready_reason}}, exc_info=not isinstance(exc, (ModelLoadError, OSError, ValueError)))
            return
        self.engine = engine
        self.not_ready_reason = None
        log.info("ready", extra={"fields": {"model": engine.model_id, "policies": sorted(policies)}})

    def start_loading(self) -> None:
        self._loader = asyncio.create_task(self.load(), name="uniguard-load")

    async def wait_loaded(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def shutdown(self) -> None:
        """Stop taking work, finish what is queued."""
        self.not_ready_reason = "shutting down"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.engine is not None:
            await self.engine.batcher.stop(timeout=self.settings.request_timeout_s)
