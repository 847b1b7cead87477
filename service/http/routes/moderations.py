"""POST /v1/moderations: OpenAI's moderation API, answered by the policies UniGuard serves.

Clients that already speak it (the OpenAI SDK's ``client.moderations.create``, LiteLLM's
``openai_moderation`` guardrail with ``api_base`` pointed here, LangChain's moderation
chain) work unchanged:

* ``input``: a string, a list of strings (one result each, in order), or a list of
  multimodal parts (one result for the whole list: its ``{"type": "text"}`` parts joined by
  newlines; ``image_url`` parts are accepted and not judged, the model reads text only).
  A text without a non-blank character is not scored: its result is not flagged, every
  score 0 and ``category_applied_input_types`` empty.
* ``model``: which policies judge. Absent, ``uniguard``, or an OpenAI moderation model name
  (``omni-moderation-latest``, ``text-moderation-stable``, ... anything starting with
  ``omni-moderation`` or ``text-moderation``): ``moderation_policies`` (default: every served
  policy). A served policy id, or several joined by commas (``toxicity,content_safety``):
  those. Anything else: 404 ``unknown_policy``.
* The answer: ``id``, ``model`` (the UniGuard model that judged, ``name@version``) and
  ``results[]`` with ``flagged`` (some policy's verdict is unsafe), ``categories`` (policy id
  -> unsafe), ``category_scores`` (policy id -> calibrated score) and
  ``category_applied_input_types`` (policy id -> ``["text"]``). The categories are UniGuard's
  policy ids, not OpenAI's category names: a client that reads ``flagged`` and iterates the
  dicts works; one that reads ``categories.harassment`` finds no such key.

All texts of a request are one engine call (one job for the batcher, one admission
budget). Limits, errors and auth are those of the other routes: more than
``max_texts_per_request`` strings is 413 ``too_many_texts``, a text over
``max_prompt_chars`` 413 ``prompt_too_long``, the body limit, the API key, 429 / 503 / 504
when the model cannot score (never a silent pass). ``x-uniguard-cache`` says whether the
verdicts came from the verdict cache.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.contract.policy import Policy
from service.core.engine import Classification, Engine, is_blank
from service.core.errors import ApiError, ErrorCode
from service.gateway.judge import check_count
from service.http.deps import EngineDep, SettingsDep, add_access_log_fields, log_prompt
from service.http.openapi import error_responses
from service.http.routes.classify import set_cache_header, set_timing_headers
from service.http.strict_body import StrictJsonRoute

router = APIRouter(tags=["moderations"], route_class=StrictJsonRoute)

PATH = "/v1/moderations"
# Model names that select the default policy set (OpenAI's moderation models, and our own name).
DEFAULT_MODEL = "uniguard"
OPENAI_MODEL_PREFIXES = ("omni-moderation", "text-moderation")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["image_url"]
    image_url: dict[str, Any] = Field(description="Accepted, not judged (the model reads text only).")


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ModerationRequest(BaseModel):
    """OpenAI's ``ModerationCreateParams``."""

    model_config = ConfigDict(extra="forbid")

    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[Part], Field(min_length=1)] = Field(
        description="A string, a list of strings (one result each), or a list of multimodal parts (one result)."
    )
    model: str | None = Field(
        None,
        max_length=2000,
        description="Absent, 'uniguard' or an OpenAI moderation model name (omni-moderation-latest, ...): the "
        "moderation_policies (default: every served policy). A served policy id or several joined by commas: those.",
    )


class ModerationResult(BaseModel):
    flagged: bool = Field(description="Some policy's verdict is unsafe.")
    categories: dict[str, bool] = Field(description="Policy id -> unsafe.")
    category_scores: dict[str, float] = Field(description="Policy id -> calibrated unsafe score.")
    category_applied_input_types: dict[str, list[Literal["text"]]] = Field(
        description='Policy id -> the input types it judged (["text"]; [] for a blank text).'
    )


class ModerationResponse(BaseModel):
    id: str
    model: str = Field(description="name@version of the UniGuard model that judged.")
    results: list[ModerationResult]


def moderation_texts(value: str | list[str] | list[TextPart | ImagePart]) -> list[str]:
    """One text per result: a string, each string of a list, or a part list's text parts joined."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    return ["\n".join(p.text for p in value if isinstance(p, TextPart))]


def moderation_policies(model: str | None, engine: Engine, default: list[str] | None) -> list[Policy]:
    """The policies ``model`` names (see the module docstring)."""
    if model is None or model == DEFAULT_MODEL or model.startswith(OPENAI_MODEL_PREFIXES):
        return engine.resolve(default or sorted(engine.policies))
    ids = [part.strip() for part in model.split(",")]
    unknown = [i for i in ids if i not in engine.policies]
    if unknown or not ids:
        raise ApiError(
            ErrorCode.unknown_policy,
            f"model {model!r} is neither a moderation model name nor served policy ids",
            {
                "unknown": unknown[:16],
                "available": sorted(engine.policies),
                "models": [DEFAULT_MODEL, "omni-moderation-latest", "text-moderation-latest"],
            },
        )
    return engine.resolve(ids)


def result_of(policies: list[Policy], classification: Classification | None) -> ModerationResult:
    if classification is None:  # a blank text: nothing to judge
        return ModerationResult(
            flagged=False,
            categories={p.id: False for p in policies},
            category_scores={p.id: 0.0 for p in policies},
            category_applied_input_types={p.id: [] for p in policies},
        )
    verdicts = classification.verdicts
    return ModerationResult(
        flagged=classification.unsafe,
        categories={v.policy_id: v.unsafe for v in verdicts},
        category_scores={v.policy_id: v.score for v in verdicts},
        category_applied_input_types={v.policy_id: ["text"] for v in verdicts},
    )


@router.post(
    PATH,
    responses=error_responses(
        ErrorCode.unknown_policy,
        ErrorCode.prompt_too_long,
        ErrorCode.too_many_texts,
        ErrorCode.body_too_large,
        ErrorCode.invalid_request,
        ErrorCode.too_many_policies,
        ErrorCode.policy_too_long,
        ErrorCode.queue_full,
        ErrorCode.not_ready,
        ErrorCode.deadline_exceeded,
        notes={ErrorCode.unknown_policy: "model names neither a moderation model nor served policies"},
    ),
)
async def moderations(
    body: ModerationRequest, engine: EngineDep, settings: SettingsDep, request: Request, response: Response
) -> ModerationResponse:
    """OpenAI-compatible moderation: each input judged under the policies ``model`` selects."""
    if isinstance(body.input, list):
        check_count(len(body.input), settings.max_texts_per_request, "inputs")
    texts = moderation_texts(body.input)
    policies = moderation_policies(body.model, engine, settings.moderation_policies)
    add_access_log_fields(request, policies=[p.id for p in policies], texts=len(texts))
    log_prompt(request, settings, "\n\n".join(texts))
    unique = list(dict.fromkeys(t for t in texts if not is_blank(t)))
    classifications = await engine.classify_many(policies, unique)
    by_text = dict(zip(unique, classifications, strict=True))
    results = [result_of(policies, by_text.get(t)) for t in texts]
    add_access_log_fields(request, unsafe=any(r.flagged for r in results))
    if classifications:
        set_timing_headers(response, classifications[0].timings)
    set_cache_header(response, classifications)
    return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=engine.model_id, results=results)
