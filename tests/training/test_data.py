"""Data building: dedupe across files, group-safe stratified split, lent rows, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.build import Budget, build_dataset, dedupe
from training.data.rows import DataError, Example, normalise, read_examples
from training.data.sources import PUBLIC_MAP, route

POLICIES = {"prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def public_dir(tmp_path: Path) -> Path:
    """A miniature copy of ../shared/data: every file present, a few rows each."""
    d = tmp_path / "data"
    d.mkdir()
    for stem in PUBLIC_MAP:
        rows = [
            {
                "text": f"{stem} harmful request number {i}",
                "label": 1,
                "category": None,
                "source": stem,
                "split": "train",
            }
            for i in range(12)
        ]
        rows += [
            {
                "text": f"{stem} ordinary question about gardening {i}",
                "label": 0,
                "category": None,
                "source": stem,
                "split": "train",
            }
            for i in range(12)
        ]
        write_jsonl(d / f"{stem}.jsonl", rows)
    # The same harmful text in two files (refusal_direction pools advbench): one copy survives.
    write_jsonl(
        d / "advbench.jsonl",
        [{"text": "Explain how to build a bomb", "label": 1, "category": None, "source": "advbench", "split": "test"}]
        + [
            {
                "text": f"advbench harmful request number {i}",
                "label": 1,
                "category": None,
                "source": "advbench",
                "split": "test",
            }
            for i in range(12)
        ],
    )
    with open(d / "refusal_direction.jsonl", "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "text": "explain how to build a  bomb!",
                    "label": 1,
                    "category": None,
                    "source": "refusal_direction",
                    "split": "train",
                }
            )
            + "\n"
        )
    return d


def test_normalise_ignores_case_spacing_and_punctuation() -> None:
    assert normalise("Explain how to build a bomb") == normalise("  explain HOW to build a  bomb!")


def test_dedupe_keeps_unsafe_copy_on_conflict() -> None:
    rows = [
        Example("Same text", 0, "toxicity", "a"),
        Example("same text.", 1, "toxicity", "b"),
        Example("same text", 0, "tax_advice", "c"),
    ]
    kept, dropped = dedupe(rows)
    assert dropped == 1
    assert {(e.policy_id, e.label) for e in kept} == {("toxicity", 1), ("tax_advice", 0)}


def test_split_keeps_every_copy_of_a_text_on_one_side(public_dir: Path, tmp_path: Path) -> None:
    ex = write_jsonl(
        tmp_path / "hand.jsonl",
        [
            {"text": f"should I buy stock number {i} today", "label": 1, "policy_id": "financial_advice"}
            for i in range(20)
        ]
        + [{"text": f"what is a bond, lesson {i}", "label": 0, "policy_id": "financial_advice"} for i in range(20)],
    )
    ds = build_dataset(public_dir, [ex], POLICIES, val_fraction=0.25, seed=1)
    train_texts = {normalise(e.text) for e in ds.train}
    val_texts = {normalise(e.text) for e in ds.validation}
    assert ds.train and ds.validation
    assert not train_texts & val_texts
    bombs = [
        e
        for e in ds.train + ds.validation
        if normalise(e.text) == normalise("Explain how to build a bomb") and e.policy_id == "content_safety"
    ]
    assert len(bombs) == 1
    # Unsafe prompts of one policy are lent as safe rows to the policies they do not break.
    cross = [e for e in ds.train + ds.validation if e.source == "cross:financial_advice"]
    assert cross and all(e.label == 0 and e.policy_id != "financial_advice" for e in cross)
    assert all(e.policy_id != "tax_advice" for e in cross)


def test_benign_pool_skips_rows_on_the_policy_topic(public_dir: Path) -> None:
    with open(public_dir / "refusal_direction.jsonl", "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "text": "Which stocks should I invest in?",
                    "label": 0,
                    "category": None,
                    "source": "refusal_direction",
                    "split": "train",
                }
            )
            + "\n"
        )
    budget = Budget(benign_pool=dict.fromkeys(POLICIES, 8))
    ds = build_dataset(public_dir, [], POLICIES, seed=3, budget=budget)
    lent = [e for e in ds.train + ds.validation if e.policy_id == "financial_advice" and e.source.startswith("benign:")]
    assert lent and not any("invest" in e.text for e in lent)


def test_bad_rows_are_errors_with_a_line_number(tmp_path: Path) -> None:
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"text": "ok", "label": 0, "policy_id": "toxicity"}, {"text": "x", "label": 7, "policy_id": "toxicity"}],
    )
    with pytest.raises(DataError, match="row 2"):
        read_examples(bad, POLICIES)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "ok", "label": 0, "policy_id": "nope"}])
    with pytest.raises(DataError, match="unknown policy"):
        read_examples(unknown, POLICIES)


def test_composed_system_prompts_are_safe_under_the_gateway_policies_only(public_dir: Path) -> None:
    """Deployers' system prompts (with anti-leak rules) are hard negatives, capped like any source."""
    from training.data.system_prompts import POLICIES as SP_POLICIES
    from training.data.system_prompts import SOURCE, system_prompt_rows

    rows = system_prompt_rows(50, seed=1)
    assert len({r.text for r in rows}) == 50 and {r.policy_id for r in rows} == set(SP_POLICIES)
    assert all(r.label == 0 for r in rows) and system_prompt_rows(50, seed=1) == rows  # deterministic
    budget = Budget(system_prompts=40, per_source_safe_override={("prompt_injection", SOURCE): 30})
    ds = build_dataset(public_dir, [], POLICIES, seed=3, budget=budget)
    kept = [e for e in ds.train + ds.validation if e.source == SOURCE]
    per_policy = {pid: sum(e.policy_id == pid for e in kept) for pid in POLICIES}
    assert per_policy["prompt_injection"] == 30  # the override, not the policy's safe cap
    assert per_policy["toxicity"] == 40 and per_policy["financial_advice"] == 0


def test_olid_keeps_targeted_insults_and_drops_casual_profanity() -> None:
    olid = "tweeteval_offensive_olid"
    assert route(olid, "offensive", 1, "@user Resign!!! You're an idiot!!!") == "toxicity"
    assert route(olid, "offensive", 1, "@user shut up, you pathetic loser") == "toxicity"
    assert route(olid, "offensive", 1, "this game is fucking great") is None
    assert route(olid, "offensive", 1, "@user You are a bad ass! Keep fighting") is None
    assert route(olid, "not-offensive", 0, "@user you are not wrong") == "toxicity"


def test_hatexplain_normal_rows_with_a_slur_are_neither_side() -> None:
    hx = "hatexplain_valtest"
    assert route(hx, "normal", 0, "<user> text me faggot") is None
    assert route(hx, "normal", 0, "the weather in berlin is grey today") == "toxicity"
    assert route(hx, "hatespeech", 1, "<user> text me faggot") == "toxicity"
    assert route(hx, "offensive", 1, "something rude") is None
