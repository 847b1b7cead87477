"""Self-reflection: the generator reviews a sample of its own rows and clarifies the policy.

Generation labels are the generator's first guess; the paper has the model re-read its
prompts against the policy and fix the ones it got wrong. Here a sampled fraction of each
batch is judged by ``votes`` independent review calls. Unanimous disagreement relabels
the row (or drops it, for generators too weak to be trusted as judges); split votes drop
it, since a row nobody can label is noise. The disagreements are kept and, at the end,
the generator proposes a clearer policy text from them. The proposal is written beside
the data with a unified diff; the shipped YAML is never touched, because a changed
description makes the served model treat the policy as zero-shot.
"""

from __future__ import annotations

import asyncio
import difflib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from service.contract.policy import Policy
from training.sdg.backends import ChatBackend, ask_json
from training.sdg.prompts import (
    PROPOSAL_SCHEMA,
    REVIEW_SCHEMA,
    PolicyProposal,
    ReviewAnswer,
    refine_messages,
    review_messages,
)
from training.sdg.store import Candidate, Counters

OnDisagree = Literal["relabel", "drop"]
MAX_CONTESTED = 200  # kept in the state file for the refinement prompt
CASES_IN_PROMPT = 10
EXAMPLES_ADDED = 4  # per label, from settled disagreements


@dataclass(frozen=True)
class ReviewConfig:
    fraction: float = 0.3
    votes: int = 1
    on_disagree: OnDisagree = "relabel"
    retries: int = 2
    temperature: float = 0.2
    max_tokens: int = 200


async def review_candidates(
    backend: ChatBackend,
    policy: Policy,
    candidates: list[Candidate],
    rng: random.Random,
    cfg: ReviewConfig,
    counts: Counters,
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Review a random ``cfg.fraction`` of the candidates; returns (kept, disagreements)."""
    chosen = [i for i in range(len(candidates)) if rng.random() < cfg.fraction]

    async def votes_for(c: Candidate) -> list[ReviewAnswer]:
        results = await asyncio.gather(
            *[
                ask_json(
                    backend,
                    review_messages(policy, c.text),
                    ReviewAnswer,
                    schema=REVIEW_SCHEMA,
                    retries=cfg.retries,
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                )
                for _ in range(cfg.votes)
            ]
        )
        for r in results:
            counts.malformed += r.malformed
            counts.failed_calls += int(r.failed)
            counts.skipped_calls += int(r.skipped)
        return [r.value for r in results if r.value is not None]

    verdicts = await asyncio.gather(*[votes_for(candidates[i]) for i in chosen])
    dropped: set[int] = set()
    contested: list[dict[str, Any]] = []
    for i, votes in zip(chosen, verdicts, strict=True):
        if not votes:
            continue  # no usable verdict: the row stays as generated, unreviewed
        c = candidates[i]
        counts.reviewed += 1
        against = [v for v in votes if v.label != c.label]
        if not against:
            continue
        unanimous = len(against) == len(votes)
        action = cfg.on_disagree if unanimous else "drop"
        contested.append(
            {
                "text": c.text,
                "label": c.label,
                "review_label": against[0].label,
                "review_rationale": against[0].rationale,
                "action": action,
                "votes_against": len(against),
                "votes": len(votes),
                "category": c.category,
            }
        )
        if action == "relabel":
            c.label, c.rationale, c.relabelled = against[0].label, against[0].rationale, True
            counts.relabelled += 1
        else:
            dropped.add(i)
            counts.dropped_review += 1
    return [c for i, c in enumerate(candidates) if i not in dropped], contested


def _with_examples(policy: Policy, contested: list[dict[str, Any]]) -> dict[str, Any]:
    """Settled hard cases become examples: the cheapest clarification a policy can get."""
    data = policy.model_dump()
    for c in contested:
        if c["action"] != "relabel":
            continue
        key = "unsafe" if c["review_label"] else "safe"
        bucket = data["examples"][key]
        if (
            c["text"] not in bucket
            and sum(1 for e in bucket if e not in getattr(policy.examples, key)) < EXAMPLES_ADDED
        ):
            bucket.append(c["text"])
    return data


async def propose_policy(
    backend: ChatBackend, policy: Policy, contested: list[dict[str, Any]], cfg: ReviewConfig, counts: Counters
) -> tuple[Policy, str]:
    """A clarified policy (same id) and a one-line note on what was changed and why."""
    if not contested:
        return policy, "no review disagreements: nothing to clarify"
    data = _with_examples(policy, contested)
    note = f"{len(contested)} review disagreement(s)"
    result = await ask_json(
        backend,
        refine_messages(policy, contested[:CASES_IN_PROMPT]),
        PolicyProposal,
        schema=PROPOSAL_SCHEMA,
        retries=cfg.retries,
        temperature=cfg.temperature,
        max_tokens=700,
    )
    counts.malformed += result.malformed
    counts.failed_calls += int(result.failed)
    counts.skipped_calls += int(result.skipped)
    if result.value is not None:
        prop: PolicyProposal = result.value
        data["description"] = " ".join(prop.description.split())
        data["allowed"] = [a.strip() for a in prop.allowed if a.strip()] or data["allowed"]
        data["disallowed"] = [d.strip() for d in prop.disallowed if d.strip()] or data["disallowed"]
        note += "; description rewritten by the generator"
    else:
        note += "; the generator gave no valid rewrite, only examples were added"
    try:
        return Policy.model_validate(data), note
    except ValidationError:
        return Policy.model_validate(_with_examples(policy, contested)), note + " (rewrite rejected by the schema)"


def policy_yaml(policy: Policy) -> str:
    return yaml.safe_dump(policy.model_dump(), sort_keys=False, allow_unicode=True, width=100)


def write_refined(original: Policy, refined: Policy, out_dir: Path, note: str, generator: str) -> tuple[Path, Path]:
    """``<out>/policies/<id>.refined.yaml`` and ``.diff``; both are proposals for a person to review."""
    folder = Path(out_dir) / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    before, after = policy_yaml(original), policy_yaml(refined)
    diff = "".join(
        difflib.unified_diff(
            before.splitlines(True),
            after.splitlines(True),
            fromfile=f"{original.id}.yaml (shipped)",
            tofile=f"{original.id}.refined.yaml",
        )
    )
    yaml_path, diff_path = folder / f"{original.id}.refined.yaml", folder / f"{original.id}.refined.diff"
    header = (
        f"# Proposed by training.sdg ({generator}): {note}.\n"
        "# A proposal to review, not loaded by the service; adopting it changes the description the model reads.\n"
    )
    for path, text in ((yaml_path, header + after), (diff_path, diff or "# no change\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return yaml_path, diff_path
