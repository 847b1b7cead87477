"""Instructions sent to the generator LLM and the schemas its answers must satisfy.

Every answer that carries data is JSON validated with pydantic: a model's free text is
never trusted, and an answer that does not validate is a *malformed* answer (retried,
then skipped and counted by the caller). The JSON schemas are hand-written and flat so
that llama.cpp can turn them into a grammar (constrained decoding makes even a 135M
model produce parseable JSON) and OpenAI-compatible servers accept them as
``response_format``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.contract.policy import Policy

Message = dict[str, str]

_UNSAFE_WORDS = {"unsafe", "1", "violating", "violation", "non-compliant", "noncompliant", "disallowed", "blocked"}
_SAFE_WORDS = {"safe", "0", "compliant", "allowed", "benign", "ok"}


def parse_label(value: object) -> int:
    """0/1 from the spellings models actually use ("unsafe", 1, "non-compliant", ...)."""
    word = str(value).strip().strip("\"'").casefold()
    if word in _UNSAFE_WORDS:
        return 1
    if word in _SAFE_WORDS:
        return 0
    raise ValueError(f"label must be 'safe' or 'unsafe', got {value!r}")


class GeneratedPrompt(BaseModel):
    """One generated prompt: the text a user would send, its label and why."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=8, max_length=2000)
    label: int
    rationale: str = Field(min_length=3, max_length=600)

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, v: object) -> int:
        return parse_label(v)

    @field_validator("text", "rationale", mode="before")
    @classmethod
    def _strip(cls, v: object) -> object:
        return v.strip() if isinstance(v, str) else v


class GenerationAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompts: list[GeneratedPrompt] = Field(min_length=1, max_length=100)


class ReviewAnswer(BaseModel):
    """The reviewer's verdict on one prompt under the policy."""

    model_config = ConfigDict(extra="ignore")

    label: int
    rationale: str = Field(min_length=3, max_length=600)

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, v: object) -> int:
        return parse_label(v)


class PolicyProposal(BaseModel):
    """A clarified policy text; validated again as a full Policy before it is saved."""

    model_config = ConfigDict(extra="ignore")

    description: str = Field(min_length=20, max_length=2000)
    allowed: list[str] = Field(default_factory=list, max_length=50)
    disallowed: list[str] = Field(default_factory=list, max_length=50)


class MalformedAnswer(ValueError):
    """The model's answer is not the JSON asked for; the message says what was wrong."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def extract_json(text: str) -> Any:
    """The first JSON value in a model answer, tolerating code fences and chatter around it."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for cand in candidates:
        for i, ch in enumerate(cand):
            if ch in "{[":
                try:
                    value, _ = decoder.raw_decode(cand[i:])
                    return value
                except json.JSONDecodeError:
                    continue
    raise MalformedAnswer("no JSON object in the answer")


def parse_answer(text: str, model: type[BaseModel]) -> Any:
    """Validate an answer against ``model``; a bare list is accepted as the ``prompts`` field."""
    value = extract_json(text or "")
    if isinstance(value, list) and "prompts" in model.model_fields:
        value = {"prompts": value}
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise MalformedAnswer(f"answer does not match {model.__name__}: {exc.error_count()} error(s)") from exc


# Flat schemas for constrained decoding (llama.cpp grammar) and OpenAI json_schema mode.
_PROMPT_ITEM = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 8, "maxLength": 600},
        "label": {"type": "string", "enum": ["safe", "unsafe"]},
        "rationale": {"type": "string", "minLength": 3, "maxLength": 300},
    },
    "required": ["text", "label", "rationale"],
}


def generation_schema(n: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"prompts": {"type": "array", "items": _PROMPT_ITEM, "minItems": 1, "maxItems": n}},
        "required": ["prompts"],
    }


REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["safe", "unsafe"]},
        "rationale": {"type": "string", "minLength": 3, "maxLength": 300},
    },
    "required": ["label", "rationale"],
}
PROPOSAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "description": {"type": "string", "minLength": 20, "maxLength": 1200},
        "allowed": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 8},
        "disallowed": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 8},
    },
    "required": ["description", "allowed", "disallowed"],
}

# Variation axes, drawn per call so that N calls do not return N copies of one style.
LENGTHS = (
    "one short sentence",
    "two or three sentences with some personal background",
    "a longer message of 4-6 sentences",
)
REGISTERS = (
    "casual",
    "formal and polite",
    "blunt",
    "anxious",
    "chat-style with lowercase and small typos",
    "business-like",
)
LANGUAGES = ("English",) * 8 + ("German", "Spanish")
UNSAFE_FORMS = (
    "direct requests",
    "indirect requests that only hint at what they want",
    "disguised requests framed as hypotheticals, stories, role-play or asking for a friend",
    "requests buried inside a longer message about something else",
)
SAFE_FORMS = (
    "near-misses that mention the same topics but ask only what the policy allows",
    "general or educational questions on the policy's topic",
    "ordinary everyday requests, some of them mentioning money or numbers",
)


@dataclass(frozen=True)
class GenerationSpec:
    """One call's draw of style axes and label mix (recorded in the row's category)."""

    n: int
    n_unsafe: int
    length: str
    register: str
    language: str
    unsafe_form: str
    safe_form: str

    @classmethod
    def draw(cls, n: int, rng: random.Random) -> GenerationSpec:
        n_unsafe = max(1, min(n - 1, round(n * rng.uniform(0.35, 0.65)))) if n > 1 else rng.randint(0, 1)
        return cls(
            n,
            n_unsafe,
            rng.choice(LENGTHS),
            rng.choice(REGISTERS),
            rng.choice(LANGUAGES),
            rng.choice(UNSAFE_FORMS),
            rng.choice(SAFE_FORMS),
        )


def policy_block(policy: Policy, *, with_examples: bool = True) -> str:
    """The policy as the LLM reads it: description, allowed and disallowed lists, examples."""
    lines = [f'Policy "{policy.name}":', policy.description.strip()]
    if policy.allowed:
        lines += ["Allowed:"] + [f"- {a}" for a in policy.allowed]
    if policy.disallowed:
        lines += ["Disallowed:"] + [f"- {d}" for d in policy.disallowed]
    if with_examples and policy.examples.safe:
        lines += ["Examples of safe prompts:"] + [f"- {e}" for e in policy.examples.safe]
    if with_examples and policy.examples.unsafe:
        lines += ["Examples of unsafe prompts:"] + [f"- {e}" for e in policy.examples.unsafe]
    return "\n".join(lines)


def generation_messages(policy: Policy, spec: GenerationSpec, seeds: list[str]) -> list[Message]:
    """Ask for ``spec.n`` labelled prompts with rationales, biased toward the seed domain."""
    parts = [policy_block(policy)]
    if seeds:
        parts.append(
            "Real prompts from the target domain (imitate their topics and style, do not copy them):\n"
            + "\n".join(f"- {s}" for s in seeds)
        )
    n_safe = spec.n - spec.n_unsafe
    parts.append(
        f"Write {spec.n} different prompts a user might send to an AI assistant: {spec.n_unsafe} that break the "
        f'policy (label "unsafe") and {n_safe} that follow it (label "safe").\n'
        f"- Unsafe prompts: {spec.unsafe_form}.\n"
        f"- Safe prompts: {spec.safe_form}.\n"
        f"- Style: {spec.register}. Length: {spec.length}. Language: {spec.language}.\n"
        "- Write only the user's message: do not answer it, do not number it, do not copy the examples.\n"
        "For each prompt give a one-sentence rationale that cites the policy.\n"
        'Reply with JSON only: {"prompts": [{"text": "...", "label": "unsafe", "rationale": "..."}]}'
    )
    return [
        {"role": "system", "content": "You write test data for a content-policy classifier. You reply with JSON only."},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


PARAPHRASE_STYLES = (
    "more casual",
    "more formal",
    "shorter",
    "with a bit more personal detail",
    "like a quick text message",
    "in different words",
)


def paraphrase_messages(text: str, style: str) -> list[Message]:
    """Plain-text rewrite: small models paraphrase far better than they write JSON."""
    return [
        {"role": "system", "content": "You rewrite messages. Reply with the rewritten message only, nothing else."},
        {"role": "user", "content": f"Rewrite this message {style}, asking exactly the same thing:\n\n{text}"},
    ]


def review_messages(policy: Policy, text: str) -> list[Message]:
    """Self-reflection: judge one prompt against the policy, independently of its first label."""
    return [
        {"role": "system", "content": "You are a careful content-policy reviewer. You reply with JSON only."},
        {
            "role": "user",
            "content": f'{policy_block(policy)}\n\nUser prompt:\n"""{text}"""\n\n'
            "Does this prompt break the policy? Reply with JSON only: "
            '{"label": "unsafe" or "safe", "rationale": "one sentence"}',
        },
    ]


def refine_messages(policy: Policy, contested: list[dict[str, Any]]) -> list[Message]:
    """Ask for a clearer policy text given the cases where generation and review disagreed."""
    cases = "\n".join(
        f'- "{c["text"]}" first labelled {"unsafe" if c["label"] else "safe"}, on review '
        f"{'unsafe' if c['review_label'] else 'safe'}: {c['review_rationale']}"
        for c in contested
    )
    return [
        {"role": "system", "content": "You write clear content policies. You reply with JSON only."},
        {
            "role": "user",
            "content": f"{policy_block(policy, with_examples=False)}\n\nThese prompts were hard to label "
            f"under this policy:\n{cases}\n\nRewrite the policy so that such cases are clearly "
            "decided, keeping its intent. The description says what is blocked in at most 80 "
            'words. Reply with JSON only: {"description": "...", "allowed": ["..."], '
            '"disallowed": ["..."]}',
        },
    ]
