"""Classification engine: (policies, prompt) -> verdicts. The layer every route calls.

It owns the rules that must not differ between the plain API and any gateway adapter:
input limits, windowing (a long prompt is scored on every window and the maximum wins,
never truncated), thresholds (calibrated only for the exact description the model was
trained on, else the zero-shot default), deadlines and the error codes for each failure.
It knows nothing of HTTP (errors are ``ApiError`` codes) nor of onnxruntime (the model is
an ``OnnxModel`` driven through the batcher). Before anything is queued each (prompt,
policy) pair is looked up in the verdict cache (``service.core.verdict_cache``); only the
pairs it misses are tokenised and scored.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.config import Settings
from service.contract.policy import EncodedWindows, InstructionTooLong, Policy, PreparedPrompt
from service.contract.textnorm import NormalizedTooLong, normalize_text
from service.core.batcher import BatcherClosed, BatchResult, MicroBatcher, PreparedWork, QueueFull
from service.core.errors import ApiError, ErrorCode
from service.core.heap import release_memory_soon
from service.core.metrics import INLINE_POLICY_LABEL, Metrics
from service.core.verdict_cache import CachedScore, VerdictCache, model_prefix, pair_key, prepared_digest
from service.model.calibration import apply_calibration
from service.model.onnx_model import OnnxModel

# Prompts longer than this (characters x policies) are tokenised in a worker thread so the
# event loop stays free; requests with more windows than this get their verdicts there too.
THREADED_TOKENIZE_CHARS = 4096
THREADED_VERDICT_WINDOWS = 2048
# A prompt's normalised text (NFKC can make 18 characters of one) and its decoded payloads
# may hold at most this many times max_prompt_chars characters; beyond, 413 before tokenising.
NORMALIZED_EXPANSION = 2
# After a request of at least this many (prompt, policy) pairs the freed memory is handed back to the OS.
RELEASE_MEMORY_WINDOWS = 2048

Verdict = Literal["safe", "unsafe"]
# Where a threshold came from: UNIGUARD_THRESHOLDS, the manifest (trained), or the zero-shot default.
ThresholdSource = Literal["config", "manifest", "default"]

WARM_UP_POLICY = Policy(id="warm-up", name="warm-up", description="Block nothing; this is a warm-up.")
# Long enough for two full windows and more: the warm-up batch is the first throughput measurement.
WARM_UP_PROMPT = "Hello, how are you? I am fine, thank you. " * 30


@dataclass(frozen=True)
class PolicyVerdict:
    policy_id: str
    unsafe: bool
    score: float  # max unsafe probability over the prompt's windows (calibrated if the manifest says how)
    threshold: float
    windows: int
    trained: bool  # the model was calibrated on this exact policy description
    cached: bool = False  # the score came from the verdict cache (service.core.verdict_cache)

    @property
    def verdict(self) -> Verdict:
        return "unsafe" if self.unsafe else "safe"


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True)
class Classification:
    verdicts: tuple[PolicyVerdict, ...]
    model: str  # name@version
    timings: Timings
    # Computed once where it is built (a worker thread for big requests): routes ask it per text.
    unsafe: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unsafe", any(v.unsafe for v in self.verdicts))


CacheOutcome = Literal["hit", "miss", "partial"]


def cache_outcome(classifications: Sequence[Classification]) -> CacheOutcome:
    """``hit``: every verdict came from the verdict cache; ``miss``: none did (or nothing was
    judged); ``partial``: some did. Routes send it as ``x-uniguard-cache``."""
    cached = [v.cached for c in classifications for v in c.verdicts]
    if cached and all(cached):
        return "hit"
    return "partial" if any(cached) else "miss"


# One text to judge and the policies it is judged under (``Engine.classify_each``).
Item = tuple[Sequence[Policy], str]


@dataclass
class _Plan:
    """A request split into cached pairs and pairs to score (prompt-major over each item's policies)."""

    cached: list[CachedScore | None]  # per pair: the cached score, or None
    source: list[int]  # per pair: its position among the scored pairs (-1 if cached)
    counts: list[int]  # per scored pair: its windows
    keys: list[bytes] | None  # per scored pair: its cache key (None without a cache)
    job: PreparedWork | None  # the scored pairs' windows, or None when every pair is cached


class Engine:
    """Scores prompts against policies with one loaded model and its batcher."""

    def __init__(
        self,
        model: OnnxModel,
        batcher: MicroBatcher,
        policies: Mapping[str, Policy],
        settings: Settings,
        metrics: Metrics | None = None,
        cache: VerdictCache | None = None,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.policies: Mapping[str, Policy] = dict(policies)
        self.settings = settings
        self.metrics = metrics
        self.cache = cache if cache is not None and cache.enabled else None
        # The model part of every cache key: the manifest names the model file by its sha256
        # and holds the input template, window length and stride; precision and provider
        # change the scores too.
        self._cache_prefix = model_prefix(f"{model.manifest.model_dump_json()}|{model.precision}|{model.provider}")
        if metrics is not None:  # verdict series at 0 for every served policy; which model serves how
            metrics.init_policies(self.policies)
            metrics.set_model(model.id, model.provider, model.precision)

    @property
    def model_id(self) -> str:
        return self.model.id

    def threshold(self, policy: Policy, sensitivity: str | None = None) -> tuple[float, bool]:
        """(threshold, trained): calibrated only if the model saw this exact description."""
        threshold, trained, _ = self.threshold_info(policy, sensitivity)
        return threshold, trained

    def threshold_info(self, policy: Policy, sensitivity: str | None = None) -> tuple[float, bool, ThresholdSource]:
        """(threshold, trained, source): source is ``config`` (UNIGUARD_THRESHOLDS, served
        policies only: one threshold at every level), ``manifest`` (the sensitivity level's
        threshold, chosen on held-out rows for this exact description; None: UNIGUARD_SENSITIVITY)
        or ``default`` (zero-shot: the manifest's default threshold)."""
        manifest = self.model.manifest
        entry = manifest.policies.get(policy.id)
        trained = entry is not None and entry.description_sha256 == policy.description_sha256()
        override = self.settings.thresholds.get(policy.id)
        if override is not None and self.policies.get(policy.id) == policy:
            return override, trained, "config"
        if trained:
            assert entry is not None
            return entry.threshold_at(sensitivity or self.settings.sensitivity), True, "manifest"
        return manifest.default_threshold, False, "default"

    def resolve(self, policy_ids: str | Sequence[str]) -> list[Policy]:
        """Served policies by id, deduplicated in request order; ApiError for bad lists."""
        ids = [policy_ids] if isinstance(policy_ids, str) else list(dict.fromkeys(policy_ids))
        if not ids:
            raise ApiError(ErrorCode.invalid_request, "policy_id must name at least one policy")
        self._check_count(len(ids))
        unknown = [i for i in ids if i not in self.policies]
        if unknown:
            raise ApiError(
                ErrorCode.unknown_policy,
                f"unknown policy {unknown[0]!r}" if len(unknown) == 1 else f"unknown policies {unknown}",
                {"unknown": unknown, "available": sorted(self.policies)},
            )
        return [self.policies[i] for i in ids]

    def _check_count(self, n: int) -> None:
        limit = self.settings.max_policies_per_request
        if n > limit:
            raise ApiError(
                ErrorCode.too_many_policies, f"{n} policies in one request; at most {limit}", {"count": n, "max": limit}
            )

    def check_prompt(self, prompt: str) -> None:
        if is_blank(prompt):
            raise ApiError(ErrorCode.empty_prompt, "prompt is empty")
        if not _encodable(prompt):
            # JSON can escape lone UTF-16 surrogates ("\ud800"); no tokenizer can read them.
            raise ApiError(
                ErrorCode.invalid_request, "prompt is not valid Unicode (it contains a lone UTF-16 surrogate)"
            )
        limit = self.settings.max_prompt_chars
        if len(prompt) > limit:
            raise ApiError(
                ErrorCode.prompt_too_long,
                f"prompt has {len(prompt)} characters; at most {limit}",
                {"chars": len(prompt), "max": limit},
            )

    def _prepare(self, items: Sequence[Item]) -> _Plan:
        """Look every (prompt, policy) pair up in the verdict cache, tokenise the others and
        build the batcher job of all their windows (None when every pair is cached).

        Pairs are prompt-major over each item's policies. Within the request a pair that
        repeats another (same key) is scored once."""
        encoder = self.model.encoder
        checked: set[int] = set()
        for policies, _ in items:
            for policy in policies:
                if id(policy) in checked:
                    continue
                checked.add(id(policy))
                details = {"policy_id": policy.id, "max_length": self.model.manifest.max_length}
                try:
                    encoder.check_policy(policy)
                except InstructionTooLong as exc:
                    raise ApiError(ErrorCode.policy_too_long, str(exc), details) from exc
        limit = self.settings.max_prompt_chars * NORMALIZED_EXPANSION
        prepared: list[PreparedPrompt] = []
        for _, prompt in items:  # normalised, scanned and tokenised once, whatever the policies
            try:
                prepared.append(encoder.prepare(prompt, limit))
            except NormalizedTooLong as exc:
                raise ApiError(
                    ErrorCode.prompt_too_long,
                    f"prompt normalises (Unicode NFKC, decoded base64) to more than {limit} characters",
                    {"chars": exc.chars, "max": limit, "limit": "normalized"},
                ) from exc
        n = sum(len(policies) for policies, _ in items)
        cache = self.cache
        keys: list[bytes] = []
        cached: list[CachedScore | None]
        if cache is not None:
            prefix = self._cache_prefix
            for (policies, _), p in zip(items, prepared, strict=True):
                digest = prepared_digest(p)
                keys += [pair_key(prefix, policy.description_sha256(), digest) for policy in policies]
            cached = cache.get_many(keys)
        else:
            cached = [None] * n
        # Which pairs are scored (the first of each key), counted before any window is built:
        # a request that cannot be queued costs no rows.
        source: list[int] = []
        to_score: list[tuple[Policy, PreparedPrompt]] = []
        scored_keys: list[bytes] = []
        first: dict[bytes, int] = {}
        pair = 0
        for (policies, _), p in zip(items, prepared, strict=True):
            for policy in policies:
                if cached[pair] is not None:
                    source.append(-1)
                elif cache is not None and keys[pair] in first:
                    source.append(first[keys[pair]])
                else:
                    if cache is not None:
                        first[keys[pair]] = len(to_score)
                        scored_keys.append(keys[pair])
                    source.append(len(to_score))
                    to_score.append((policy, p))
                pair += 1
        counts = [encoder.window_count(policy, p) for policy, p in to_score]
        if counts:
            self._check_queue(sum(counts), len(items), exact=True)
        flat = EncodedWindows([], [], [])
        for policy, p in to_score:
            # Into one set of rows at once: a pair's own lists would be five objects per pair
            # for the cyclic gc to scan (12,000 texts x 5 policies: 300,000 objects, each
            # full gc pass a stall of the event loop).
            encoded = encoder.windows(policy, p)
            flat.input_ids.extend(encoded.input_ids)
            flat.attention_mask.extend(encoded.attention_mask)
            flat.token_type_ids.extend(encoded.token_type_ids)
        job = self.batcher.prepare(flat) if counts else None
        return _Plan(cached, source, counts, scored_keys if cache is not None else None, job)

    async def _encode(self, items: Sequence[Item]) -> tuple[_Plan, float]:
        started = time.perf_counter()
        # The cost is the characters times the policies; above a few thousand the event loop
        # (health probes, other requests) must not wait for the tokenizer.
        if sum(len(prompt) * len(policies) for policies, prompt in items) > THREADED_TOKENIZE_CHARS:
            task = asyncio.ensure_future(asyncio.to_thread(self._prepare, items))
            try:
                plan = await asyncio.shield(task)
            except asyncio.CancelledError:  # the deadline passed: the thread runs on, its job is never queued
                task.add_done_callback(self._discard_prepared)
                raise
        else:
            plan = self._prepare(items)
        return plan, time.perf_counter() - started

    def _discard_prepared(self, task: asyncio.Future[_Plan]) -> None:
        if not task.cancelled() and task.exception() is None:
            job = task.result().job
            if job is not None:
                self.batcher.discard(job)

    async def classify(
        self, policies: Sequence[Policy], prompt: str, *, inline: bool = False, sensitivity: str | None = None
    ) -> Classification:
        """Verdict of ``prompt`` under each policy; ``inline`` marks request-supplied policies.

        Raises ApiError: empty_prompt, prompt_too_long (also over the window budget),
        too_many_policies, policy_too_long, queue_full (also: would miss its deadline behind the
        queue), not_ready (stopping), deadline_exceeded.
        """
        (result,) = await self.classify_many(policies, [prompt], inline=inline, sensitivity=sensitivity)
        return result

    async def classify_many(
        self,
        policies: Sequence[Policy],
        prompts: Sequence[str],
        *,
        inline: bool = False,
        sensitivity: str | None = None,
    ) -> list[Classification]:
        """Verdicts of each prompt under each policy, scored as ONE submission to the batcher.

        One request is one job however many texts it holds: its windows are counted against
        the queue and the window budget together, before anything is queued, and the fair
        schedule gives it one share (12,000 texts used to be 12,000 tasks, each tokenised on
        the event loop and each a job of its own). Same errors as ``classify``; any prompt's
        error fails the whole call.
        """
        items = [(policies, prompt) for prompt in prompts]
        return await self.classify_each(items, inline=inline, sensitivity=sensitivity)

    async def classify_each(
        self, items: Sequence[Item], *, inline: bool = False, sensitivity: str | None = None
    ) -> list[Classification]:
        """``classify_many`` where each prompt has its own policies (a chat: user messages under
        the guard policies, tool results under prompt_injection): still one job, one budget.

        Pairs found in the verdict cache are not scored again; a request whose every pair is
        cached is answered without queueing for the model (``service.core.verdict_cache``).
        """
        started = time.perf_counter()
        if not items:
            return []
        for policies, prompt in items:
            self.check_prompt(prompt)
            if not policies:
                raise ApiError(ErrorCode.invalid_request, "no policy given")
        distinct = list({id(p): p for policies, _ in items for p in policies}.values())
        for policy in distinct:
            if not _encodable(policy.description):
                raise ApiError(
                    ErrorCode.invalid_request,
                    f"policy {policy.id!r}: description is not valid Unicode (lone UTF-16 surrogate)",
                )
        for policies, _ in items:
            self._check_count(len(policies))
        # Every (prompt, policy) pair needs a window at least: refuse before tokenising anything.
        pairs = sum(len(policies) for policies, _ in items)
        self._check_queue(pairs, len(items), exact=False)
        try:
            return await self._classify_each(items, inline, started, sensitivity)
        finally:
            if pairs >= RELEASE_MEMORY_WINDOWS:
                # Answered or refused, the request's token rows are freed now: hand the pages back.
                release_memory_soon()

    async def _classify_each(
        self, items: Sequence[Item], inline: bool, started: float, sensitivity: str | None = None
    ) -> list[Classification]:
        job: PreparedWork | None = None
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                plan, tokenize_s = await self._encode(items)
                job = plan.job
                if job is None:  # every pair was cached: nothing to queue
                    result = BatchResult(np.empty(0, dtype=np.float32), 0.0, 0.0)
                else:
                    self._check_queue(job.n, len(items), exact=True)
                    # No await between the budget check and submit: what it counted is what is queued.
                    self.check_budget(job.windows, self.settings.request_timeout_s - (time.perf_counter() - started))
                    job.deadline = started + self.settings.request_timeout_s
                    result = await self.batcher.submit(job)
        except TimeoutError as exc:
            raise ApiError(
                ErrorCode.deadline_exceeded, f"not answered within {self.settings.request_timeout_s} s"
            ) from exc
        except QueueFull as exc:
            raise ApiError(ErrorCode.queue_full, "server is overloaded; retry shortly", {"reason": str(exc)}) from exc
        except BatcherClosed as exc:
            raise ApiError(ErrorCode.not_ready, "server is shutting down") from exc
        finally:
            if job is not None:
                self.batcher.discard(job)  # refused before it was queued: free its rows now, not at the next gc
        total_windows = job.n if job is not None else 0
        plan.job = None
        del job  # its token rows: not kept while the answer is built
        args = (items, plan, result, tokenize_s, started, inline, sensitivity)
        if total_windows > THREADED_VERDICT_WINDOWS:  # tens of thousands of verdicts: not on the event loop
            return await asyncio.to_thread(self._classifications, *args)
        return self._classifications(*args)

    def _classifications(
        self,
        items: Sequence[Item],
        plan: _Plan,
        result: BatchResult,
        tokenize_s: float,
        started: float,
        inline: bool,
        sensitivity: str | None = None,
    ) -> list[Classification]:
        """The verdicts of a scored request, counted in the metrics (thread-safe: may run off the loop)."""
        verdicts = self._verdicts(items, plan, result.probabilities, sensitivity)
        total_s = time.perf_counter() - started
        timings = Timings(result.queue_s * 1e3, tokenize_s * 1e3, result.inference_s * 1e3, total_s * 1e3)
        if self.metrics is not None:
            self.metrics.observe_tokenize_time(tokenize_s)
            self.metrics.observe_request_latency(total_s)
            tally = Counter(
                (INLINE_POLICY_LABEL if inline else v.policy_id, v.verdict) for row in verdicts for v in row
            )
            for (label, verdict), n in tally.items():
                self.metrics.observe_verdict(label, verdict, n)
        return [Classification(row, self.model_id, timings) for row in verdicts]

    def _verdicts(
        self, items: Sequence[Item], plan: _Plan, probabilities: np.ndarray, sensitivity: str | None = None
    ) -> list[tuple[PolicyVerdict, ...]]:
        """Per prompt, per policy: the most unsafe window's calibrated score against the
        threshold (calibration is increasing, so the most unsafe window stays the most
        unsafe). Scored pairs' raw maxima go into the verdict cache."""
        raw: list[float] = []
        windows: list[int] = []
        maxima: list[float] = []
        if plan.counts:
            flat = np.asarray(plan.counts, dtype=np.int64)
            assert flat.min() >= 1  # every pair has a window: reduceat needs rising starts
            starts = np.concatenate(([0], np.cumsum(flat)[:-1]))
            maxima = np.maximum.reduceat(probabilities, starts).tolist()
            if self.cache is not None and plan.keys is not None:
                self.cache.put_many(list(zip(plan.keys, zip(maxima, plan.counts, strict=True), strict=True)))
        for hit, src in zip(plan.cached, plan.source, strict=True):
            if hit is not None:
                raw.append(hit[0])
                windows.append(hit[1])
            else:
                raw.append(maxima[src])
                windows.append(plan.counts[src])
        scores = apply_calibration(self.model.manifest.calibration, np.asarray(raw, dtype=np.float64)).tolist()
        info: dict[int, tuple[str, float, bool]] = {}
        out = []
        pair = 0
        for policies, _ in items:
            row = []
            for policy in policies:
                entry = info.get(id(policy))
                if entry is None:
                    entry = info[id(policy)] = (policy.id, *self.threshold(policy, sensitivity))
                pid, threshold, trained = entry
                score = scores[pair]
                row.append(
                    PolicyVerdict(
                        pid, score >= threshold, score, threshold, windows[pair], trained, plan.cached[pair] is not None
                    )
                )
                pair += 1
            out.append(tuple(row))
        return out

    def _check_queue(self, windows: int, prompts: int, *, exact: bool) -> None:
        """413 for a request whose windows could never be queued at once (``exact``: counted
        after tokenising; else the lower bound of one window per prompt and policy)."""
        limit = self.batcher.max_queue
        if windows <= limit:
            return
        what = "prompt" if prompts == 1 else f"request ({prompts} texts)"
        need = f"{windows}" if exact else f"at least {windows}"
        raise ApiError(
            ErrorCode.prompt_too_long,
            f"{what} needs {need} model windows; the service queues at most {limit}",
            {"windows": windows, "max": limit, "limit": "queue"},
        )

    def check_budget(self, windows: EncodedWindows, remaining_s: float) -> None:
        """Refuse at admission what cannot be scored before its deadline (docs/operations.md, "Limits").

        budget = max(min_window_budget x max_length, remaining_s x throughput x window_budget_factor)
        tokens, where throughput is the batcher's measured padded tokens per second of model
        time (first measured on the warm-up batch). A request whose own tokens exceed it can
        never be scored in time: 413 prompt_too_long, ``details.limit = "window_budget"``. One
        that fits alone but not behind the work the fair schedule runs before it finishes
        (``MicroBatcher.backlog``), or that would make a queued request miss its deadline:
        429 queue_full, ``details.reason = "window_budget"``, with Retry-After. The rule
        (docs/hardening.md) models the fair schedule as processor sharing: a job of p tokens
        is done once the model has run its own p and up to p of every other job (plus the
        batches in flight); the new job is admitted when that fits its budget for itself and
        for every queued job (each of which the new one delays by up to min(tokens, p)) in
        ``window_budget_factor`` x its time left. The job carries its deadline into the queue.
        """
        factor = self.settings.window_budget_factor
        rate = self.batcher.throughput
        if factor <= 0 or rate is None:
            return
        max_length = self.model.manifest.max_length
        budget = max(float(self.settings.min_window_budget * max_length), max(remaining_s, 0.0) * rate * factor)
        tokens = windows.tokens
        details = {
            "windows": windows.count,
            "budget": int(budget // max_length),  # in full-length windows
            "tokens": tokens,
            "budget_tokens": int(budget),
            "throughput_tokens_per_s": round(rate, 1),
            "deadline_s": self.settings.request_timeout_s,
        }
        if tokens > budget:
            raise ApiError(
                ErrorCode.prompt_too_long,
                f"request needs {windows.count} model windows ({tokens} tokens); "
                "at the measured throughput the model scores "
                f"about {details['budget']} full windows within the {self.settings.request_timeout_s} s deadline",
                {"limit": "window_budget", **details},
            )
        inflight, queued = self.batcher.backlog()
        late = _first_late(tokens, inflight, queued, time.perf_counter(), rate * factor, budget)
        if late is not None:
            ahead = inflight + sum(min(p, tokens) for p, _ in queued)
            raise ApiError(
                ErrorCode.queue_full,
                "server is overloaded: this request would not be scored within its deadline behind the queued work, "
                "or would make queued work miss its own; retry shortly",
                {"reason": "window_budget", "ahead_tokens": ahead, "protects": late, **details},
                headers={"Retry-After": str(max(1, math.ceil(ahead / rate)))},
            )

    async def warm_up(self) -> None:
        """One real pass through tokenizer, batcher and model before the service says ready;
        its full-length batch is the batcher's first throughput measurement."""
        await asyncio.to_thread(self.model.warm_up)
        await asyncio.to_thread(normalize_text, "\u00e9")  # builds the combining-run pattern off the loop
        encoded = self.model.encoder.encode(WARM_UP_POLICY, WARM_UP_PROMPT)
        n = max(1, min(2, encoded.count - 1, self.batcher.max_queue))  # full-length windows (the last one is shorter)
        await self.batcher.submit(
            EncodedWindows(encoded.input_ids[:n], encoded.attention_mask[:n], encoded.token_type_ids[:n])
        )


def _first_late(
    tokens: int,
    inflight: int,
    queued: Sequence[tuple[int, float]],
    now: float,
    rate: float,
    own_budget: float,
) -> str | None:
    """Which job would miss its deadline if a job of ``tokens`` joined the queue: "own",
    "queued", or None (``Engine.check_budget``; ``rate`` already scaled by the budget factor).

    Under round-robin a job of p pending tokens finishes after inflight + sum(min(p_k, p))
    tokens (its own included): sorted ascending, that is the prefix of smaller jobs plus p
    times the rest. A queued job that would be late anyway does not hold others back: only
    one the new job would make late counts. O(jobs log jobs)."""
    if inflight + sum(min(p, tokens) for p, _ in queued) + tokens > own_budget:
        return "own"
    jobs = sorted(queued)
    smaller = 0
    for i, (p, deadline) in enumerate(jobs):
        without = inflight + smaller + p * (len(jobs) - i)
        slack = rate * max(deadline - now, 0.0)
        if without <= slack < without + min(tokens, p):  # on time without it, late with it
            return "queued"
        smaller += p
    return None


def is_blank(text: str) -> bool:
    """Nothing but white space and byte-order marks: an empty prompt (gateways skip such texts)."""
    return not text.replace("\ufeff", "").strip()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
