"""Prometheus metrics, one registry per app (no global registry: tests run many apps).

Labels are bounded on purpose: a policy label is a served policy id or the literal
``inline``, never request text, so a client cannot blow up the series count.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 50 us .. 10 s, about three buckets per decade: queue waits sit at tens of microseconds,
# CPU inference of a batch at milliseconds, an overloaded request at seconds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PADDING_BUCKETS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)

INLINE_POLICY_LABEL = "inline"
# Judgement outcomes of the gateway routes (service.gateway.judge.Judgement.outcome).
GATEWAY_ACTIONS = ("allowed", "blocked", "unguarded")
RELOAD_OUTCOMES = ("ok", "failed")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """All service metrics; implements ``service.core.batcher.BatchObserver`` and
    ``service.core.verdict_cache.CacheObserver``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "uniguard_requests_total",
            "Policy verdicts given, by policy and verdict.",
            ["policy", "verdict"],
            registry=r,
        )
        self.request_latency = Histogram(
            "uniguard_request_latency_seconds",
            "End-to-end time of one classification.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "uniguard_queue_time_seconds",
            "Time a submission waited for its first batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_time = Histogram(
            "uniguard_tokenize_time_seconds",
            "Time to encode a prompt into windows.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "uniguard_inference_time_seconds", "Model time of one batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "uniguard_batch_size", "Windows per model call.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "uniguard_batch_tokens", "Real (unpadded) tokens per model call.", buckets=BATCH_TOKEN_BUCKETS, registry=r
        )
        self.batch_padded_tokens = Histogram(
            "uniguard_batch_padded_tokens",
            "Tokens the model computed per call (windows x longest window).",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padding = Histogram(
            "uniguard_batch_padding_ratio",
            "Share of a model call's tokens that are padding.",
            buckets=PADDING_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("uniguard_queue_depth", "Windows waiting for a batch.", registry=r)
        self.throughput = Gauge(
            "uniguard_model_throughput_tokens_per_second",
            "Padded tokens per second of busy model time over recent batches (the admission budget's estimate).",
            registry=r,
        )
        self.rejected = Counter(
            "uniguard_rejected_total", "Requests refused to shed load, by reason.", ["reason"], registry=r
        )
        self.errors = Counter("uniguard_errors_total", "Error responses, by error code.", ["code"], registry=r)
        self.reloads = Counter(
            "uniguard_reloads_total", "Hot reloads (admin or SIGHUP), by outcome.", ["outcome"], registry=r
        )
        self.gateway = Counter(
            "uniguard_gateway_judgements_total",
            "Gateway judgements (LiteLLM guardrail, OpenAI proxy), by route and action.",
            ["route", "action"],
            registry=r,
        )
        self.cache_hits = Counter(
            "uniguard_cache_hits", "Verdict cache lookups answered from the cache, per (text, policy).", registry=r
        )
        self.cache_misses = Counter(
            "uniguard_cache_misses", "Verdict cache lookups that had to be scored, per (text, policy).", registry=r
        )
        self.cache_evictions = Counter(
            "uniguard_cache_evictions", "Verdict cache entries dropped to stay within its bounds.", registry=r
        )
        self.cache_entries = Gauge("uniguard_cache_entries", "Entries in the verdict cache.", registry=r)
        self.cache_bytes = Gauge("uniguard_cache_bytes", "Memory the verdict cache's entries take.", registry=r)
        self.model_info = Gauge(
            "uniguard_model_info",
            "The served model (1 for the current one).",
            ["model", "provider", "precision"],
            registry=r,
        )

    # -- engine ------------------------------------------------------------------------

    def init_policies(self, policy_ids: Iterable[str]) -> None:
        """Create each served policy's verdict series at 0 (an unsafe rate of 0 is data; a missing series is not)."""
        for pid in [*policy_ids, INLINE_POLICY_LABEL]:
            for verdict in ("safe", "unsafe"):
                self.requests.labels(policy=pid, verdict=verdict)

    def init_series(self, error_codes: Iterable[str], rejection_codes: Iterable[str], routes: Iterable[str]) -> None:
        """Create every labelled series that can be known before traffic at 0: a panel or an
        alert on ``rate(uniguard_rejected_total[5m])`` shows 0 on a healthy server, not "no data"."""
        for code in error_codes:
            self.errors.labels(code=code)
        for code in rejection_codes:
            self.rejected.labels(reason=code)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)
        for route in routes:
            for action in GATEWAY_ACTIONS:
                self.gateway.labels(route=route, action=action)

    def set_model(self, model: str, provider: str, precision: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model=model, provider=provider, precision=precision).set(1)

    def observe_gateway(self, route: str, action: str) -> None:
        self.gateway.labels(route=route, action=action).inc()

    def observe_verdict(self, policy_label: str, verdict: str, count: int = 1) -> None:
        self.requests.labels(policy=policy_label, verdict=verdict).inc(count)

    def observe_request_latency(self, seconds: float) -> None:
        self.request_latency.observe(seconds)

    def observe_tokenize_time(self, seconds: float) -> None:
        self.tokenize_time.observe(seconds)

    # -- batcher (BatchObserver) -------------------------------------------------------

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def observe_batch(self, size: int, tokens: int, inference_s: float, padded_tokens: int | None = None) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.inference_time.observe(inference_s)
        if padded_tokens:
            self.batch_padded_tokens.observe(padded_tokens)
            self.batch_padding.observe(1.0 - tokens / padded_tokens)

    def observe_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_throughput(self, tokens_per_s: float) -> None:
        self.throughput.set(tokens_per_s)

    # -- verdict cache (CacheObserver) ---------------------------------------------------

    def observe_cache(self, hits: int, misses: int) -> None:
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)

    def observe_cache_evictions(self, count: int) -> None:
        self.cache_evictions.inc(count)

    def observe_cache_size(self, entries: int, size_bytes: int) -> None:
        self.cache_entries.set(entries)
        self.cache_bytes.set(size_bytes)

    # -- errors ------------------------------------------------------------------------

    def record_error(self, code: str, rejected: bool = False) -> None:
        self.errors.labels(code=code).inc()
        if rejected:
            self.rejected.labels(reason=code).inc()

    # -- runtime -----------------------------------------------------------------------

    def record_reload(self, ok: bool) -> None:
        self.reloads.labels(outcome=RELOAD_OUTCOMES[0] if ok else RELOAD_OUTCOMES[1]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
