"""What one running app holds (settings, metrics, the serving engine) and how it starts,
reloads and stops.

Start-up: loading runs in a background task so the process answers /healthz at once and
stays up (not ready, with the reason) when the model cannot be loaded: an orchestrator then
sees a clear readiness error instead of a crash loop.

Hot reload (``POST /admin/reload`` or SIGHUP): policies and model are loaded, validated
(``service.model.folder_checks``) and warmed up on their own batcher *beside* the serving engine;
only then is ``self.engine`` swapped, in one assignment. If anything fails, or the whole
load takes longer than ``reload_timeout_s`` (a read that never returns), the old engine
keeps serving, the reload lock is released and the outcome says why. Every request pins the engine it first uses
(``EngineLease``, installed by ``service.http.middleware.EngineLeaseMiddleware``), so a request that started on the
old version finishes on it, and its ``model`` field names that version; the old engine's
batcher is stopped once no request holds it any more.

Shutdown (SIGTERM, see ``service.http.server``): ``begin_drain`` turns /readyz to 503 while
requests are still served; uvicorn then stops accepting and waits for in-flight requests;
``shutdown`` finally drains the batchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from service.config import Settings
from service.contract.policy import PolicyFileError, load_policies
from service.core.batcher import MicroBatcher
from service.core.engine import Engine
from service.core.errors import REJECTION_CODES, ApiError, ErrorCode
from service.core.heap import release_memory_soon
from service.core.metrics import Metrics
from service.core.verdict_cache import VerdictCache
from service.model.folder_checks import check_policies_fit, load_and_validate, policy_warnings
from service.model.onnx_model import ModelLoadError

log = logging.getLogger("uniguard.runtime")
T = TypeVar("T")

# Where a request's EngineLease lives in the ASGI scope state.
LEASE_STATE_KEY = "engine_lease"
# Errors whose message is the whole story (no traceback in the log).
_EXPECTED_LOAD_ERRORS = (ModelLoadError, PolicyFileError, OSError, ValueError)


@dataclass(frozen=True)
class ReloadOutcome:
    """What a load or reload did; returned by POST /admin/reload and logged."""

    ok: bool
    trigger: str  # startup | admin | sighup | test
    model: str | None  # the model serving after this attempt (the old one if it failed)
    previous_model: str | None
    policies: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None  # why it failed
    elapsed_ms: float = 0.0
    at: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineLease:
    """The engine one request uses: pinned at its first use, released when the request ends."""

    __slots__ = ("_runtime", "engine")

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.engine: Engine | None = None

    def release(self) -> None:
        self._runtime._unpin(self)


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.engine: Engine | None = None  # the serving engine; swapped whole on reload
        self.load_error: str | None = None  # why there is no engine (None while loading)
        self.draining = False  # SIGTERM received: /readyz 503, requests still served
        self.stopping = False  # lifespan shutdown: no new work at all
        self.last_reload: ReloadOutcome | None = None
        self._reload_lock = asyncio.Lock()
        self._lease_lock = threading.Lock()
        self._leases: dict[Engine, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # start-up load, signal-triggered reloads
        self._retiring: set[asyncio.Task[None]] = set()
        self._loader: asyncio.Task[Any] | None = None
        # One verdict cache for the serving engine, emptied when a reload switches engines.
        self.cache = VerdictCache(settings.verdict_cache_entries, settings.verdict_cache_bytes, self.metrics)

    # -- state -------------------------------------------------------------------------

    @property
    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503; None when ready."""
        if self.stopping or self.draining:
            return "shutting down"
        if self.engine is None:
            return self.load_error or "model is loading"
        return None

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    def record_error(self, code: ErrorCode) -> None:
        self.metrics.record_error(code.value, rejected=code in REJECTION_CODES)

    # -- engines for requests ------------------------------------------------------------

    def engine_for(self, lease: EngineLease | None = None) -> Engine:
        """The engine a request must use: the one it already pinned while that one still
        runs, else the serving one (pinned now). ApiError not_ready when there is none.

        Draining still serves: readiness is off so the load balancer stops sending, but what
        it already sent is answered.
        """
        if lease is not None and lease.engine is not None and lease.engine.batcher.running:
            return lease.engine
        with self._lease_lock:
            engine = self.engine
            if engine is None or self.stopping:
                raise ApiError(ErrorCode.not_ready, self.not_ready_reason or "not ready")
            if lease is not None and lease.engine is not engine:
                self._unpin_locked(lease)
                self._leases[engine] = self._leases.get(engine, 0) + 1
                lease.engine = engine
        return engine

    def _unpin(self, lease: EngineLease) -> None:
        with self._lease_lock:
            self._unpin_locked(lease)

    def _unpin_locked(self, lease: EngineLease) -> None:
        engine, lease.engine = lease.engine, None
        if engine is not None:
            left = self._leases.get(engine, 0) - 1
            if left > 0:
                self._leases[engine] = left
            else:
                self._leases.pop(engine, None)

    def leases(self, engine: Engine) -> int:
        """Requests currently pinned to ``engine``."""
        with self._lease_lock:
            return self._leases.get(engine, 0)

    # -- loading and reloading -----------------------------------------------------------

    async def _build(self) -> tuple[Engine, list[str]]:
        """Policies, model (validated), batcher, warm-up: a complete engine, not yet serving."""
        s = self.settings
        policies = await _off_loop(load_policies, s.policies_dir)
        if not policies:
            raise ValueError(f"no *.yaml policies in {s.policies_dir}")
        workers, worker_threads = s.inference_layout()
        model = await _off_loop(
            load_and_validate,
            s.model_dir,
            s.threads,
            provider=s.provider,
            device_id=s.device_id,
            spinning=s.spinning,
            int8_weights=s.int8_weights,
            worker_threads=worker_threads,
        )
        check_policies_fit(model, policies)  # a policy that could never be served fails the (re)load
        warnings = policy_warnings(model, policies, s.thresholds)
        batcher = MicroBatcher(
            model.run,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_padding=s.max_padding,
            max_queue=s.max_queue,
            pad_id=model.pad_id,
            observer=self.metrics,
            workers=workers,
            run_shared=model.run_shared if worker_threads is not None else None,
        )
        await batcher.start()
        try:
            engine = Engine(model, batcher, policies, s, self.metrics, self.cache)
            await engine.warm_up()
        except BaseException:
            await batcher.stop(timeout=1.0)
            raise
        return engine, warnings

    async def reload(self, trigger: str = "admin") -> ReloadOutcome:
        """Load policies and model beside the serving engine and switch to them atomically;
        on any failure keep serving the old engine and say why. Reloads run one at a time."""
        async with self._reload_lock:
            started = time.perf_counter()
            previous = self.engine
            prev_id = previous.model_id if previous is not None else None
            at = datetime.now(UTC).isoformat(timespec="seconds")
            if self.stopping:
                return self._finish(ReloadOutcome(False, trigger, prev_id, prev_id, reason="shutting down", at=at))
            deadline = asyncio.timeout(self.settings.reload_timeout_s)
            try:
                async with deadline:
                    engine, warnings = await self._build()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError) and deadline.expired():
                    # A read that never returns (a FIFO, a dead network mount) stays blocked in its
                    # worker thread; the lock is released and the previous version keeps serving.
                    reason = (
                        f"timed out after {self.settings.reload_timeout_s:g} s (UNIGUARD_RELOAD_TIMEOUT_S): "
                        f"a file in {self.settings.model_dir} or {self.settings.policies_dir} may not be readable"
                    )
                if self.engine is None:
                    self.load_error = f"model not loaded: {reason}"
                else:  # an Engine built before the failure may have announced itself in the metrics
                    _announce(self.metrics, self.engine)
                outcome = ReloadOutcome(False, trigger, prev_id, prev_id, reason=reason, elapsed_ms=_ms(started), at=at)
                log.error(
                    "load failed" if previous is None else "reload failed, still serving the previous model",
                    extra={"fields": outcome.as_dict()},
                    exc_info=not isinstance(exc, _EXPECTED_LOAD_ERRORS),
                )
                return self._finish(outcome)
            if self.stopping:  # shutdown began while loading: never switch now
                await engine.batcher.stop(timeout=1.0)
                return self._finish(ReloadOutcome(False, trigger, prev_id, prev_id, reason="shutting down", at=at))
            with self._lease_lock:
                self.engine = engine  # the switch: requests from here on pin the new engine
                self.load_error = None
            # Scores of the previous model or policies are not kept (keys name the model and the
            # description, so what a request still pinned to the old engine adds is never misread).
            self.cache.clear()
            if previous is not None:
                self._spawn_retire(previous)
            _announce(self.metrics, engine)
            outcome = ReloadOutcome(
                True,
                trigger,
                engine.model_id,
                prev_id,
                sorted(engine.policies),
                warnings,
                elapsed_ms=_ms(started),
                at=at,
            )
            log.info("ready" if previous is None else "reloaded", extra={"fields": outcome.as_dict()})
            for warning in warnings:
                log.warning("policy warning", extra={"fields": {"warning": warning, "model": engine.model_id}})
            return self._finish(outcome)

    def _finish(self, outcome: ReloadOutcome) -> ReloadOutcome:
        self.last_reload = outcome
        if outcome.trigger != "startup":
            self.metrics.record_reload(outcome.ok)
        return outcome

    async def load(self) -> None:
        """The start-up load; failures are recorded (not ready, with the reason), never raised."""
        await self.reload(trigger="startup")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_loading(self) -> None:
        self._loader = self._spawn(self.load(), "uniguard-load")

    async def wait_loaded(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    def request_reload(self, trigger: str = "sighup") -> asyncio.Task[Any] | None:
        """Schedule a reload from synchronous code on the event loop (a signal handler)."""
        if self.stopping:
            return None
        return self._spawn(self.reload(trigger=trigger), f"uniguard-reload-{trigger}")

    def _spawn_retire(self, engine: Engine) -> None:
        task = asyncio.create_task(self._retire(engine), name="uniguard-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        # Once the task is done nothing holds the old engine: its sessions and their arenas are
        # freed, and the pages malloc kept for them go back to the OS (reloads under load
        # otherwise grew the RSS by one model's working set each).
        task.add_done_callback(lambda _: release_memory_soon())

    async def _retire(self, engine: Engine) -> None:
        """Stop an engine that was swapped out, once no request is pinned to it."""
        timeout = max(2 * self.settings.request_timeout_s, 5.0)
        deadline = time.monotonic() + timeout
        while self.leases(engine) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = self.leases(engine)
        if left:
            log.warning(
                "retiring a model still pinned by requests",
                extra={"fields": {"model": engine.model_id, "requests": left}},
            )
        await engine.batcher.stop(timeout=self.settings.request_timeout_s)
        log.info("previous model retired", extra={"fields": {"model": engine.model_id}})

    # -- shutdown ------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: readiness off at once; requests keep being served until uvicorn stops accepting."""
        if not self.draining:
            self.draining = True
            log.info("draining: /readyz answers 503, in-flight and new requests are still served")

    async def shutdown(self) -> None:
        """Stop taking work, finish what is queued (uvicorn has already waited for in-flight requests)."""
        self.draining = True
        self.stopping = True
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        engine = self.engine
        if engine is not None:
            await engine.batcher.stop(timeout=self.settings.request_timeout_s)
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)


async def _off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread of its own, awaited.

    Not ``asyncio.to_thread``: a load the reload timeout abandons (a read stuck in the kernel)
    would keep an executor thread that ``asyncio.run`` and the interpreter wait for at exit,
    so the process could not stop. A daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(done: Callable[[], None]) -> None:
        if not future.done():  # else abandoned: timed out or cancelled
            done()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            done = functools.partial(future.set_exception, exc)
        else:
            done = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, done)

    threading.Thread(target=run, name="uniguard-load", daemon=True).start()
    return await future


def _announce(metrics: Metrics, engine: Engine) -> None:
    """uniguard_model_info names the serving model."""
    metrics.set_model(engine.model.id, engine.model.provider, engine.model.precision)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 1)
