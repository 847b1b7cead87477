"""Which public file (``../shared/data``) feeds which policy, and which rows are lent to others.

Pure data plus ``load_public``: the mapping is a decision about the datasets, reviewed on
its own, so it lives apart from the balancing code that uses it.
"""

from __future__ import annotations

import re
from pathlib import Path

from training.data.rows import DataError, Example, read_jsonl

# How public files map to policies. (file stem, policy, category filter) -> rows kept as labelled.
# Rows of a category listed in EXCLUDE are dropped for that policy; REROUTE sends them elsewhere.
PUBLIC_MAP: dict[str, str] = {
    "deepset_prompt_injections": "prompt_injection",
    "jailbreak_classification": "prompt_injection",
    "itw_jailbreak_prompts": "prompt_injection",
    "jbb_jailbreak_prompts": "prompt_injection",
    "toxic_chat_human": "toxicity",
    "refusal_direction": "content_safety",
    "harmbench": "content_safety",
    "advbench": "content_safety",
    "strongreject": "content_safety",
    "malicious_instruct": "content_safety",
    "jbb_behaviors": "content_safety",
    "forbidden_questions": "content_safety",
    "davidson_hate_offensive": "toxicity",
    "stormfront_hate": "toxicity",
    "tensor_trust_defenses": "prompt_injection",
    "tensor_trust_attacks": "prompt_injection",
    "bipia_indirect": "prompt_injection",
    "arena_hard_prompts": "content_safety",
    "chatgpt_system_prompts": "prompt_injection",
    "jailbreak_llms_inthewild": "prompt_injection",
    "oasst_prompts": "content_safety",
}
# Not read: hh_rlhf_harmless_base. Its rows are all labelled unsafe, yet 20-25 % are harmless
# openers ("hi, can you help me"): as positives they would teach that chat openers are
# harmful, and relabelling 2,170 rows by hand is not done yet.
# (file stem, category) -> policy, or None to drop: categories the file's policy does not cover.
REROUTE: dict[tuple[str, str], str | None] = {
    ("toxic_chat_human", "jailbreaking"): "prompt_injection",
    ("forbidden_questions", "Financial Advice"): "financial_advice",
    # Copyright requests ("give me the lyrics of ...") are not harmful help under content_safety.
    ("harmbench", "copyright/copyright"): None,
    # Label decision: davidson's "offensive" class is mostly casual profanity that targets no
    # one, which the toxicity policy allows; as positives it taught that informal web text is
    # toxic (benign web comments 94 % flagged). Only "hate" is unsafe; "neither" is benign.
    ("davidson_hate_offensive", "toxicity/offensive"): None,
}
# Forbidden-question categories (forbidden_questions, and the same questions inside
# jailbreak_llms_inthewild as "<policy>/forbidden_question:<category>"): several are not
# harmful help under content_safety. Health and legal advice feed the zero-shot evaluation
# (policies the model never trains on); government decisions and lobbying break no policy here.
FORBIDDEN_QUESTION_ROUTE: dict[str, str | None] = {
    "Illegal Activity": "content_safety",
    "Malware": "content_safety",
    "Physical Harm": "content_safety",
    "Economic Harm": "content_safety",
    "Fraud": "content_safety",
    "Privacy Violence": "content_safety",
    "Hate Speech": "toxicity",
    "Pornography": "toxicity",
    "Financial Advice": "financial_advice",
    "Health Consultation": "medical_advice",
    "Legal Opinion": "legal_advice",
    "Gov Decision": None,
    "Political Lobbying": None,
}
FORBIDDEN_QUESTION_FILES = ("forbidden_questions", "jailbreak_llms_inthewild")

# Evaluation-only sources: never trained on (nor any near-duplicate of their texts), scored
# by the release step as the out-of-source protocol, and named in the manifest. Chosen so
# that every shipped policy has held-out benign text unlike its training sources (real chat
# prompts, public system prompts, forum text) and, where public data allows, held-out unsafe
# text of another origin (in-the-wild jailbreaks, forbidden questions, forum hate).
EVAL_ONLY_FILES = (
    "stormfront_hate",
    "chatgpt_system_prompts",
    "jailbreak_llms_inthewild",
    "forbidden_questions",
    "oasst_prompts",
)
# Benign rows of these evaluation-only files are scored under every listed policy (they are
# safe under all of them); their unsafe rows count only under their own policy.
EVAL_BENIGN_POLICIES: dict[str, tuple[str, ...]] = {
    "oasst_prompts": ("prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"),
    "chatgpt_system_prompts": ("prompt_injection", "toxicity", "content_safety"),
    "stormfront_hate": ("toxicity", "content_safety", "prompt_injection"),
}
# Safe rows of these files form a general benign pool, lent to every policy as safe examples.
# Drawn round-robin across files, so Alpaca (25k rows) no longer is most of every policy's safe side.
BENIGN_POOL_FILES = (
    "refusal_direction",
    "toxic_chat_human",
    "deepset_prompt_injections",
    "jailbreak_classification",
    "arena_hard_prompts",
    "davidson_hate_offensive",
    "tensor_trust_defenses",
)


# Benign-pool rows that touch a policy's topic are not lent to it: "what stocks should I buy"
# sits in Alpaca as a benign instruction, yet it is exactly what financial_advice forbids.
POOL_TOPIC_EXCLUDE: dict[str, re.Pattern[str]] = {
    "financial_advice": re.compile(
        r"invest|stock|share|bond|fund|etf|crypto|bitcoin|portfolio|retire|pension|401|ira\b|mortgage|loan|"
        r"debt|saving|money|financ|wealth|trading|trade|broker|dividend|asset|budget",
        re.I,
    ),
    "tax_advice": re.compile(r"tax|irs|deduct|accountant|audit|vat\b|income|refund|fiscal|hmrc", re.I),
}

# Which policies' unsafe prompts are clearly safe under which others.
CROSS_NEGATIVES: dict[str, tuple[str, ...]] = {
    "financial_advice": ("prompt_injection", "toxicity", "content_safety"),
    "tax_advice": ("prompt_injection", "toxicity", "content_safety"),
    "content_safety": ("prompt_injection", "financial_advice", "tax_advice"),
    "toxicity": ("prompt_injection", "financial_advice", "tax_advice"),
    "prompt_injection": ("financial_advice", "tax_advice"),
}


# Unsafe rows of these categories also break the target policies: never lend them as safe.
CROSS_SKIP_CATEGORIES = {"evasion"}


def route(stem: str, category: str | None, label: int) -> str | None:
    """The policy a public row belongs to, or None when it is dropped (see the tables above)."""
    policy = PUBLIC_MAP[stem]
    if not category:
        return policy
    if stem in FORBIDDEN_QUESTION_FILES and label == 1:
        name = category.split(":", 1)[1] if ":" in category else category
        if name in FORBIDDEN_QUESTION_ROUTE:
            return FORBIDDEN_QUESTION_ROUTE[name]
    if stem == "oasst_prompts" and label == 1:
        return "content_safety"  # the six rows relabelled by hand: weapons or theft
    return REROUTE.get((stem, category), policy)


def load_public(data_dir: Path) -> list[Example]:
    """Every row of the shared public files, mapped to its policy (before balancing)."""
    out = []
    for stem in PUBLIC_MAP:
        path = Path(data_dir) / f"{stem}.jsonl"
        if not path.exists():
            raise DataError(f"missing public data file {path}")
        for row in read_jsonl(path):
            target = route(stem, row.get("category"), int(row["label"]))
            if target is None:
                continue
            out.append(Example(row["text"], int(row["label"]), target, stem, row.get("category")))
    return out
