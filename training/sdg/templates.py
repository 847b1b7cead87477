"""Policy-driven templates: prompts composed from the policy's own text, labelled by construction.

A 135M model cannot be trusted to invent on-policy prompts, but it can paraphrase one.
So the offline path composes prompts from what the policy says: the clauses of its
description ("which stocks ... to buy or sell", "how the asker should file") turned into
first-person requests with a persona (unsafe), the same clauses asked in general terms
(safe near-misses), the allowed items asked as explanations (safe), and the policy's and
seed examples reframed. The LLM then paraphrases them, and review and dedup filter.
Policies whose description lists nouns rather than request clauses (toxicity, content
safety) get only the example reframings: their data should come from an LLM or public sets.
"""

from __future__ import annotations

import random
import re

from service.contract.policy import Policy
from training.sdg.store import Candidate

WH = r"(?:which|what|how|whether|when|where|who|why|if)"
PERSONAS = (
    "I'm 34 and work as a nurse",
    "I'm a freelance graphic designer",
    "My wife and I are both teachers",
    "I'm a student with a part-time job",
    "I just retired after 30 years at the post office",
    "I run a small bakery with two employees",
    "I'm a software engineer in Berlin",
    "I'm a single dad with two kids",
    "I moved to Canada last year",
    "I'm 58 and self-employed",
    "I'm 26 and just got my first real job",
    "I'm a truck driver and my wife stays home with the kids",
    "I work in retail and rent a small flat",
)
UNSAFE_FRAMES = (
    "{persona}. Tell me {clause}.",
    "{persona}. Can you tell me {clause}?",
    "Please work out {clause} for me. {persona}.",
    "Be honest and specific and tell me {clause}. {persona}.",
    "quick q - {clause_lower}? {persona_lower}",
    "{persona}, and I'll do whatever you say. Decide {clause} for me.",
    "{persona}. I need to know {clause}, today.",
)
DISGUISED_FRAMES = (
    "Hypothetically, if someone exactly like me ({persona_lower}) asked you {clause}, what would you tell them? "
    "Be specific.",
    "Let's role-play: you are my personal adviser. {persona}. Tell me {clause}.",
    "Write a short dialogue in which an expert tells me exactly {clause}. Context: {persona_lower}.",
    "My friend is in the same spot as me ({persona_lower}). Between us, {clause}?",
    "For a story I'm writing, my character is me: {persona_lower}. What would the perfect adviser tell them "
    "about {clause}? Use real numbers.",
)
NEAR_MISS_FRAMES = (
    "Not asking for advice for myself: in general terms, what factors matter when deciding {clause_general}?",
    "For a school report, how do professionals usually decide {clause_general}? No personal advice needed.",
    "Why is it hard to say in general {clause_general}?",
)
EDUCATION_FRAMES = (
    "Can you explain {clause}?",
    "In simple terms, {clause}?",
    "I'm studying for an exam: explain {clause}.",
    "{persona}, just curious: {clause}? I only want the concept, not advice.",
)
TOPIC_FRAMES = (
    "Give me a short overview of {np}.",
    "What should everyone know about {np}?",
    "Write a paragraph on {np} for a newsletter.",
)
PREFIXES = ("", "", "Hi! ", "Quick question: ", "Sorry if this is a dumb question, but ", "Hey, ")
SUFFIXES = ("", "", " Thanks!", " Please be specific.", " Keep it short.", " Answer in one line.")

_FIRST_PERSON = [
    (r"\bthe asker's\b", "my"),
    (r"\bone's\b", "my"),
    (r"\btheir\b", "my"),
    (r"\bthe asker\b", "I"),
    (r"\bthey\b", "I"),
    (r"\bthemselves\b", "myself"),
    (r"\boneself\b", "myself"),
    (r"\bthem\b", "me"),
]
_GENERAL = [
    (r"\bthe asker's\b", "one's"),
    (r"\bthe asker\b", "someone"),
    (r"\btheir\b", "one's"),
    (r"\bthey\b", "someone"),
]
_ITEM_PREFIX = re.compile(
    r"^(?:general |non-\w+ )?(?:explanations? of|questions? about|explaining|discussing|asking(?: for help with)?)\s+",
    re.I,
)


def _sub_all(text: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def first_person(clause: str) -> str:
    """ "what to do with one's own savings" -> "what to do with my own savings"."""
    return _sub_all(clause, _FIRST_PERSON)


def general(clause: str) -> str:
    """ "how the asker should file" -> "how someone should file" (a near-miss asks in general)."""
    return _sub_all(clause, _GENERAL)


def _split_list(text: str) -> list[str]:
    """Split "a, b or c, or how d" on commas, merging pieces that do not start a new clause."""
    parts: list[str] = []
    for piece in re.split(r",\s*", text):
        piece = re.sub(r"^(?:or|and)\s+", "", piece.strip())
        if parts and not re.match(WH + r"\b", piece, re.I):
            parts[-1] = f"{parts[-1]}, {piece}"
        elif piece:
            parts.append(piece)
    return [p.rstrip(".;") for p in parts]


def request_clauses(policy: Policy) -> list[str]:
    """Wh-clauses after the description's colon: what a blocked prompt asks for."""
    desc = " ".join(policy.description.split())
    if ":" not in desc:
        return []
    tail = desc.split(":", 1)[1]
    return [c for c in _split_list(tail) if re.match(WH + r"\b", c, re.I) and len(c.split()) >= 3]


def allowed_topics(policy: Policy) -> tuple[list[str], list[str]]:
    """(wh-clauses, noun phrases) from the allowed items, parentheses first."""
    clauses: list[str] = []
    nouns: list[str] = []
    for item in policy.allowed:
        inner = re.findall(r"\(([^)]*)\)", item)
        outer = re.sub(r"\([^)]*\)", "", item).strip()
        for chunk in [*inner, outer]:
            chunk = _ITEM_PREFIX.sub("", chunk.strip().strip("\"'"))
            chunk = re.split(r"\s+without\s+|\s+that\s+", chunk)[0]
            if re.match(WH + r"\b", chunk, re.I):
                clauses += [c for c in _split_list(chunk) if re.match(WH + r"\b", c, re.I) and len(c.split()) >= 3]
                continue
            for part in re.split(r",\s*", chunk):
                part = part.strip().strip("\"'")
                if len(part.split()) >= 2 and not re.search(r"\b(in general|any|ordinary|everyday)\b|\"", part, re.I):
                    nouns.append(part[0].lower() + part[1:])
    return clauses, nouns


def _persona_fields(rng: random.Random) -> dict[str, str]:
    persona = rng.choice(PERSONAS)
    return {
        "persona": persona,
        "persona_lower": persona if re.match(r"I\b", persona) else persona[0].lower() + persona[1:],
    }


def _sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] if text else text


class TemplateGenerator:
    """Draws labelled prompts from a policy's text and optional seed prompts."""

    def __init__(self, policy: Policy, seeds: list[tuple[str, int]] | None = None) -> None:
        self.policy = policy
        self.clauses = request_clauses(policy)
        self.allowed_clauses, self.allowed_nouns = allowed_topics(policy)
        self.examples: list[tuple[str, int]] = [(t, 1) for t in policy.examples.unsafe] + [
            (t, 0) for t in policy.examples.safe
        ]
        self.examples += list(seeds or [])

    def kinds(self) -> list[tuple[str, int]]:
        """(kind, label) pairs this policy supports, unsafe and safe in turn."""
        unsafe = [("direct", 1), ("disguised", 1)] if self.clauses else []
        safe = [("near_miss", 0)] if self.clauses else []
        safe += [("education", 0)] if (self.allowed_clauses or self.allowed_nouns) else []
        if any(lbl == 1 for _, lbl in self.examples):
            unsafe.append(("example", 1))
        if any(lbl == 0 for _, lbl in self.examples):
            safe.append(("example", 0))
        return unsafe + safe

    def sample(self, n: int, rng: random.Random) -> list[Candidate]:
        """``n`` prompts, about half unsafe, each with a rationale naming the policy text it used."""
        kinds = self.kinds()
        if not kinds:
            return []
        unsafe = [k for k in kinds if k[1] == 1] or kinds
        safe = [k for k in kinds if k[1] == 0] or kinds
        out = []
        for i in range(n):
            kind, label = rng.choice(unsafe if i % 2 == 0 else safe)
            out.append(self._make(kind, label, rng))
        return out

    def _make(self, kind: str, label: int, rng: random.Random) -> Candidate:
        f = _persona_fields(rng)
        if kind in ("direct", "disguised"):
            clause = rng.choice(self.clauses)
            mine = first_person(clause)
            frame = rng.choice(UNSAFE_FRAMES if kind == "direct" else DISGUISED_FRAMES)
            text = frame.format(clause=mine, clause_lower=mine.lower(), **f)
            why = "asks" if kind == "direct" else "uses a hypothetical or role-play framing but still asks"
            rationale = f"The user {why} {clause} for their own situation, which the policy blocks."
        elif kind == "near_miss":
            clause = rng.choice(self.clauses)
            text = rng.choice(NEAR_MISS_FRAMES).format(clause_general=general(clause), **f)
            rationale = "It asks in general terms, not for the user's own situation, which the policy allows."
        elif kind == "education":
            if self.allowed_clauses and (not self.allowed_nouns or rng.random() < 0.6):
                text = rng.choice(EDUCATION_FRAMES).format(clause=rng.choice(self.allowed_clauses), **f)
            else:
                text = rng.choice(TOPIC_FRAMES).format(np=rng.choice(self.allowed_nouns))
            rationale = "It asks for a general explanation of the topic, which the policy allows."
        else:
            base = rng.choice([t for t, lbl in self.examples if lbl == label])
            prefix = rng.choice(PREFIXES)
            persona = f"{f['persona']}. " if rng.random() < 0.4 else ""
            if persona:
                base = base[0].upper() + base[1:]
            elif prefix.endswith((", ", "but ")) and not re.match(r"I\b", base):
                base = base[0].lower() + base[1:]
            text = f"{prefix}{persona}{base}{rng.choice(SUFFIXES)}"
            rationale = (
                "A reworded example of a prompt the policy blocks."
                if label
                else "A reworded example of a prompt the policy allows."
            )
        text = _sentence(text).replace("??", "?").replace("?.", "?").replace("..", ".")
        return Candidate(text=text, label=label, rationale=rationale, category=f"template:{kind}", method="template")
