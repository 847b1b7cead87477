"""Gateway guard: judge several texts (chat messages, LiteLLM texts), each against its policies.

Shared by the LiteLLM guardrail route and the OpenAI-compatible proxy so both apply the
same rules:

* a request's cost is bounded before any work: at most ``max_texts_per_request`` texts
  (routes call ``check_count``), and the engine counts all windows of all texts against
  the queue and the window budget before any is queued;
* every non-blank text is scored against its own policies (``GuardText.policies``: a chat
  message's role decides them, ``service.gateway.roles``), or the call's policy list when it
  has none (identical texts once, all in one engine call: one job for the micro-batcher);
  the request is unsafe if any verdict is;
* fail-closed by default: when the model cannot score (``not_ready``, ``queue_full``,
  ``deadline_exceeded``) the caller gets that error (503 / 429 / 504, retryable), never a
  silent pass;
* ``fail_open`` lets a request through unjudged (``unguarded``, marked as such) only when
  the model is unavailable for reasons outside the request: ``not_ready`` (loading,
  failed, stopping) or ``queue_full`` (the queue, or the work ahead in it, is other
  requests': the request's own windows were checked to fit alone). Never for what the
  request did itself: its size (``too_many_texts``, ``prompt_too_long``, window budget
  413) or its own deadline (``deadline_exceeded``: an attacker would pad an injection
  until it times out and have it forwarded);
* other errors (a text over ``max_prompt_chars``, an unknown policy) are always errors:
  they are not about availability. Unknown policies from the *configuration* are the
  operator's mistake and answer 500, not 404.

Nothing here knows about HTTP. Routes pass the metrics, the route name and the engine as a
zero-argument ``get_engine``: it is called inside the failure rule, so a missing engine
(``not_ready``) fails open like any other unscorable error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.contract.policy import Policy
from service.core.engine import CacheOutcome, Classification, Engine, cache_outcome, is_blank
from service.core.errors import ApiError, ErrorCode
from service.core.metrics import Metrics

log = logging.getLogger("uniguard.guard")

# Failures from outside the request (no model, others' work fills the queue): the only ones
# fail_open lets through. deadline_exceeded is not one: the request's own size can cause it.
UNSCORABLE = frozenset({ErrorCode.not_ready, ErrorCode.queue_full})
# Longest blocked reason listed per violation in a summary.
MAX_LISTED_VIOLATIONS = 8

# The engine a request uses: returns it, or raises ApiError not_ready when there is none.
EngineSource = Callable[[], Engine]


@dataclass(frozen=True)
class GuardText:
    index: int  # position in the request (message index, or index in LiteLLM's texts)
    text: str
    role: str | None = None
    policies: tuple[str, ...] = ()  # its own policies (by role); empty: the call's policy_ids


@dataclass(frozen=True)
class TextResult:
    item: GuardText
    classification: Classification


@dataclass(frozen=True)
class Judgement:
    policies: tuple[str, ...]
    results: tuple[TextResult, ...] = ()
    model: str | None = None
    unguarded: str | None = None  # fail-open: the error code that stopped scoring
    checked: int = field(default=0)
    unsafe: bool = field(init=False)  # computed once: routes ask several times, results may be thousands

    def __post_init__(self) -> None:
        object.__setattr__(self, "unsafe", any(r.classification.unsafe for r in self.results))

    @property
    def cache(self) -> CacheOutcome:
        """Whether the verdicts came from the verdict cache (``x-uniguard-cache``): hit, partial or miss."""
        return cache_outcome([r.classification for r in self.results])

    @property
    def outcome(self) -> str:
        return "unguarded" if self.unguarded else ("blocked" if self.unsafe else "allowed")

    def violations(self) -> list[dict[str, Any]]:
        out = []
        for r in self.results:
            for v in r.classification.verdicts:
                if v.unsafe:
                    item: dict[str, Any] = {"index": r.item.index}
                    if r.item.role is not None:
                        item["role"] = r.item.role
                    item.update(policy_id=v.policy_id, score=round(v.score, 4), threshold=v.threshold)
                    out.append(item)
        return out

    def summary(self, stage: str) -> dict[str, Any]:
        """What clients see in ``uniguard`` fields: never the text itself."""
        out: dict[str, Any] = {
            "action": self.outcome,
            "stage": stage,
            "policies": list(self.policies),
            "texts_checked": self.checked,
            "model": self.model,
            "violations": self.violations(),
        }
        if self.unguarded:
            out["unguarded_reason"] = self.unguarded
        return out

    def reason(self) -> str:
        """One line for LiteLLM's blocked_reason and logs."""
        parts = [
            f"text {v['index']} violates {v['policy_id']} (score {v['score']:.2f} >= {v['threshold']:.2f})"
            for v in self.violations()[:MAX_LISTED_VIOLATIONS]
        ]
        return "UniGuard: " + "; ".join(parts)


def check_count(count: int, limit: int, what: str) -> None:
    """413 ``too_many_texts`` when a request holds more than ``limit`` texts or messages:
    refused before any parsing of them, tokenising or scoring (never fail-open)."""
    if count > limit:
        raise ApiError(
            ErrorCode.too_many_texts,
            f"{count} {what} in one request; at most {limit}",
            {"count": count, "max": limit, "field": what},
        )


async def judge(
    get_engine: EngineSource,
    metrics: Metrics,
    texts: Sequence[GuardText],
    policy_ids: Sequence[str],
    *,
    route: str,
    from_config: bool,
    fail_open: bool,
) -> Judgement:
    """Score ``texts`` under ``policy_ids``; see the module docstring for the failure rule.

    ``route`` (one of the gateway paths) labels the outcome in the metrics and the logs.
    """
    judgement = await _judge(get_engine, texts, policy_ids, route=route, from_config=from_config, fail_open=fail_open)
    metrics.observe_gateway(route, judgement.outcome)
    return judgement


async def _judge(
    get_engine: EngineSource,
    texts: Sequence[GuardText],
    policy_ids: Sequence[str],
    *,
    route: str,
    from_config: bool,
    fail_open: bool,
) -> Judgement:
    default = tuple(dict.fromkeys(policy_ids))
    # Every policy some text is judged under, in order (the call's own when no text has its own).
    ids = tuple(dict.fromkeys(p for t in texts for p in (t.policies or default))) or default
    try:
        engine = get_engine()
        # Every policy set is resolved, even with nothing to judge: a misconfigured one is an error at once.
        sets = {t.policies or default for t in texts} or {default}
        resolved = {key: _resolve(engine, key, from_config) for key in sets}
        items = [t for t in texts if not is_blank(t.text)]
        if not items:
            return Judgement(ids, (), engine.model_id, None, 0)
        # Identical (text, policies) once, the whole request in one engine call (one job).
        unique = list(dict.fromkeys((t.text, t.policies or default) for t in items))
        classifications = await engine.classify_each([(resolved[key], text) for text, key in unique])
        by_pair = dict(zip(unique, classifications, strict=True))
        results = tuple(TextResult(t, by_pair[(t.text, t.policies or default)]) for t in items)
        return Judgement(ids, results, engine.model_id, None, len(items))
    except ApiError as exc:
        if fail_open and exc.code in UNSCORABLE:
            log.warning("fail-open: not scored, let through", extra={"fields": {"code": exc.code.value, "path": route}})
            return Judgement(ids, unguarded=exc.code.value)
        raise


def _resolve(engine: Engine, ids: Sequence[str], from_config: bool) -> list[Policy]:
    try:
        return engine.resolve(list(ids))
    except ApiError as exc:
        if from_config and exc.code is ErrorCode.unknown_policy:
            raise ApiError(
                ErrorCode.internal_error,
                "the configured guard policies name a policy this server does not serve",
                exc.details,
            ) from exc
        raise
