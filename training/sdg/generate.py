"""The SDG run: batches of candidates -> filter -> dedup -> review -> committed rows, per policy.

A batch mixes LLM generation (JSON, N prompts per call, style axes drawn per call) and
policy templates paraphrased by the LLM, according to ``mode``. Each batch is filtered
(chatter, refusals, lengths), deduplicated against everything kept, partly reviewed,
and committed durably before the next starts, so the run can be killed at any point and
rerun with the same command. A policy stops when it has ``rows_per_policy`` kept rows or
after ``max_batches`` (a generator that only repeats itself must not loop forever).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.contract.policy import Policy
from training.data.rows import read_jsonl
from training.sdg.backends import BackendError, ChatBackend, ask_json
from training.sdg.dedup import Embedder, NearDuplicateIndex, cosine_pairs
from training.sdg.prompts import (
    PARAPHRASE_STYLES,
    GenerationAnswer,
    GenerationSpec,
    generation_messages,
    generation_schema,
    paraphrase_messages,
)
from training.sdg.refine import MAX_CONTESTED, ReviewConfig, propose_policy, review_candidates, write_refined
from training.sdg.store import Candidate, Counters, PolicyStore
from training.sdg.templates import TemplateGenerator
from training.ui import console

log = logging.getLogger(__name__)
Mode = Literal["llm", "template", "mixed"]
Seed = tuple[str, int | None]
# Text a prompt never contains but a chatty or refusing generator writes.
_CHATTER = re.compile(
    r"^(sure|certainly|here is|here's|rewritten|paraphrase|okay|ok,)\b|"
    r"^(i'?m sorry|i cannot|i can't|as an ai)\b|\"(label|rationale|prompts)\"\s*:",
    re.I,
)


@dataclass
class SDGConfig:
    rows_per_policy: int = 200
    batch_size: int = 16  # candidates drawn per batch, before filtering
    mode: Mode = "mixed"
    prompts_per_call: int = 8
    temperature: float = 0.9
    max_tokens: int = 1536
    malformed_retries: int = 2
    paraphrase: bool = True
    paraphrase_min_sim: float = 0.6  # rewrites further from their template than this drifted off-policy
    dedup_threshold: float = 0.9
    review: ReviewConfig = field(default_factory=ReviewConfig)
    refine: bool = True
    seeds_per_call: int = 4
    max_batches: int | None = None
    seed: int = 13

    def batch_limit(self) -> int:
        return (
            self.max_batches
            if self.max_batches is not None
            else 4 * math.ceil(self.rows_per_policy / self.batch_size) + 2
        )


def plausible(text: str) -> bool:
    """A user prompt, not model chatter, a refusal or leaked JSON."""
    words = text.split()
    return 8 <= len(text) <= 1500 and len(words) >= 3 and not _CHATTER.search(text.strip())


def clean_paraphrase(text: str) -> str:
    """First line of a rewrite, without quotes or a 'Rewritten message:' lead-in (small models ramble on)."""
    text = re.sub(
        r"^\s*(rewrite (the |this )?message|rewritten( message)?|paraphrase|message)\s*:\s*",
        "",
        text.strip(),
        flags=re.I,
    )
    text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return text.strip("\"'“”").strip()


def load_seeds(paths: list[Path], policy_id: str) -> list[Seed]:
    """Seed prompts for one policy: JSONL rows with ``text`` (and ``label``); rows of another policy are skipped."""
    out: list[Seed] = []
    for path in paths:
        for row in read_jsonl(path):
            if row.get("policy_id") not in (None, policy_id) or not str(row.get("text", "")).strip():
                continue
            label = row.get("label")
            out.append((str(row["text"]).strip(), int(label) if label in (0, 1, "0", "1") else None))
    return out


class Generator:
    """One run over several policies with one backend and one embedder."""

    def __init__(
        self,
        backend: ChatBackend,
        embedder: Embedder,
        out_dir: Path,
        cfg: SDGConfig,
        *,
        seeds: dict[str, list[Seed]] | None = None,
        against: dict[str, list[str]] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.backend, self.embedder, self.out_dir, self.cfg = backend, embedder, Path(out_dir), cfg
        self.seeds = seeds or {}
        self.against = against or {}
        self.on_batch = on_batch  # called after each committed batch (tests kill the run here)
        self.show_progress = show_progress

    async def run(self, policies: list[Policy]) -> dict[str, Counters]:
        totals: dict[str, Counters] = {}
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.show_progress,
        )
        try:
            with progress:
                for policy in policies:
                    totals[policy.id] = await self._run_policy(policy, progress)
        finally:
            await self.backend.aclose()
        return totals

    async def _run_policy(self, policy: Policy, progress: Progress) -> Counters:
        cfg, store = self.cfg, PolicyStore(self.out_dir, policy.id)
        state = store.open()
        state.generator = state.generator or self.backend.name
        index = NearDuplicateIndex(self.embedder, cfg.dedup_threshold)
        index.add([r["text"] for r in store.rows()] + self.against.get(policy.id, []))
        seeds = self.seeds.get(policy.id, [])
        templates = TemplateGenerator(policy, [(t, lbl) for t, lbl in seeds if lbl is not None])
        task = progress.add_task(policy.id, total=cfg.rows_per_policy, completed=state.counts.kept, info="")
        while state.counts.kept < cfg.rows_per_policy and state.batches_done < cfg.batch_limit():
            batch = state.batches_done
            rng = random.Random(f"{cfg.seed}:{policy.id}:{batch}")
            counts = Counters(batches=1)
            candidates = await self._candidates(policy, templates, seeds, rng, counts)
            counts.generated += len(candidates)
            good = [c for c in candidates if plausible(c.text)]
            counts.filtered += len(candidates) - len(good)
            keep = index.filter([c.text for c in good])
            counts.duplicates += keep.count(False)
            fresh = [c for c, k in zip(good, keep, strict=True) if k]
            fresh, contested = await review_candidates(self.backend, policy, fresh, rng, cfg.review, counts)
            counts.kept += len(fresh)
            state.counts.add(counts)
            state.contested = (state.contested + contested)[-MAX_CONTESTED:]
            state.batches_done += 1
            state.refined = False
            store.commit([c.to_row(policy.id, self.backend.name, batch) for c in fresh], state)
            progress.update(
                task,
                completed=min(state.counts.kept, cfg.rows_per_policy),
                info=(
                    f"batch {state.batches_done} · dup {state.counts.duplicates} · "
                    f"malformed {state.counts.malformed} · relabelled {state.counts.relabelled}"
                ),
            )
            if self.on_batch is not None:
                self.on_batch(policy.id, state.batches_done)
        if cfg.refine and not state.refined:
            refined, note = await propose_policy(self.backend, policy, state.contested, cfg.review, state.counts)
            if refined is not policy:
                write_refined(policy, refined, self.out_dir, note, self.backend.name)
            state.refined = True
            store.save_state(state)
        return state.counts

    async def _candidates(
        self, policy: Policy, templates: TemplateGenerator, seeds: list[Seed], rng: random.Random, counts: Counters
    ) -> list[Candidate]:
        cfg = self.cfg
        n_llm = {"llm": cfg.batch_size, "template": 0, "mixed": cfg.batch_size // 2}[cfg.mode]
        if not templates.kinds():
            n_llm = cfg.batch_size  # nothing to compose from: the LLM writes everything
        calls = []
        left = n_llm
        while left > 0:
            n = min(cfg.prompts_per_call, left)
            shown = [t for t, _ in rng.sample(seeds, min(cfg.seeds_per_call, len(seeds)))] if seeds else []
            calls.append(self._generate(policy, GenerationSpec.draw(n, rng), shown, counts))
            left -= n
        drafts = templates.sample(cfg.batch_size - n_llm, rng)
        styles = [rng.choice(PARAPHRASE_STYLES) for _ in drafts]
        results = await asyncio.gather(*calls, self._paraphrase_all(drafts, styles, counts))
        return [c for group in results for c in group]

    async def _generate(
        self, policy: Policy, spec: GenerationSpec, seeds: list[str], counts: Counters
    ) -> list[Candidate]:
        res = await ask_json(
            self.backend,
            generation_messages(policy, spec, seeds),
            GenerationAnswer,
            schema=generation_schema(spec.n),
            retries=self.cfg.malformed_retries,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )
        counts.malformed += res.malformed
        counts.failed_calls += int(res.failed)
        counts.skipped_calls += int(res.skipped)
        if res.value is None:
            return []
        category = f"llm:{spec.register.split()[0]}:{spec.language.lower()}"
        return [Candidate(p.text, p.label, p.rationale, category, "llm") for p in res.value.prompts[: spec.n]]

    async def _paraphrase_all(self, drafts: list[Candidate], styles: list[str], counts: Counters) -> list[Candidate]:
        """Rewrite each template prompt; a rewrite that drifts from its source's meaning is discarded."""
        if not self.cfg.paraphrase or not drafts:
            return drafts

        async def one(c: Candidate, style: str) -> str | None:
            try:
                text = await self.backend.complete(
                    paraphrase_messages(c.text, style), temperature=self.cfg.temperature, max_tokens=160
                )
            except BackendError:
                counts.failed_calls += 1
                return None
            return clean_paraphrase(text)

        rewrites = await asyncio.gather(*[one(c, s) for c, s in zip(drafts, styles, strict=False)])
        pairs = [(i, r) for i, r in enumerate(rewrites) if r and plausible(r) and r != drafts[i].text]
        sims = cosine_pairs(self.embedder, [r for _, r in pairs], [drafts[i].text for i, _ in pairs])
        accepted = {i: r for (i, r), s in zip(pairs, sims, strict=True) if s >= self.cfg.paraphrase_min_sim}
        counts.paraphrased += len(accepted)
        counts.paraphrase_rejected += sum(1 for r in rewrites if r is not None) - len(accepted)
        out = []
        for i, c in enumerate(drafts):
            if i in accepted:
                c = Candidate(accepted[i], c.label, c.rationale, c.category + ":paraphrase", c.method, origin=c.text)
            out.append(c)
        return out


TABLE_COLUMNS = (
    "batches",
    "generated",
    "kept",
    "duplicates",
    "relabelled",
    "dropped_review",
    "reviewed",
    "malformed",
    "skipped_calls",
    "failed_calls",
    "filtered",
    "paraphrased",
    "paraphrase_rejected",
)


def summary_table(totals: dict[str, Counters]) -> Table:
    table = Table(title="Synthetic data (cumulative over resumed runs)")
    table.add_column("policy")
    for c in TABLE_COLUMNS:
        table.add_column(c.replace("_", " "), justify="right")
    for pid, counts in totals.items():
        table.add_row(pid, *[str(getattr(counts, c)) for c in TABLE_COLUMNS])
    return table
