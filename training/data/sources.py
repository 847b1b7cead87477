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
}
# (file stem, category) -> policy, or None to drop: categories the file's policy does not cover.
REROUTE: dict[tuple[str, str], str | None] = {
    ("toxic_chat_human", "jailbreaking"): "prompt_injection",
    ("forbidden_questions", "Financial Advice"): "financial_advice",
    # Copyright requests ("give me the lyrics of ...") are not harmful help under content_safety.
    ("harmbench", "copyright/copyright"): None,
}
# Safe rows of these files form a general benign pool, lent to every policy as safe examples.
BENIGN_POOL_FILES = ("refusal_direction", "toxic_chat_human", "deepset_prompt_injections", "jailbreak_classification")


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


def load_public(data_dir: Path) -> list[Example]:
    """Every row of the shared public files, mapped to its policy (before balancing)."""
    out = []
    for stem, policy in PUBLIC_MAP.items():
        path = Path(data_dir) / f"{stem}.jsonl"
        if not path.exists():
            raise DataError(f"missing public data file {path}")
        for row in read_jsonl(path):
            target = REROUTE.get((stem, row.get("category")), policy) if row.get("category") else policy
            if target is None:
                continue
            out.append(Example(row["text"], int(row["label"]), target, stem, row.get("category")))
    return out
