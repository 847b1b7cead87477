"""Release the search's winner: rebuild it from its recipe, then the one release step.

The merged weights are rebuilt from the recipe (not kept from the search), saved as a
transformers checkpoint and released by ``training.release.finalize.release_checkpoint``
like every model folder: int8 (or fp32) ONNX, every validation row scored through the
service's own loader, temperature scaling, per-policy thresholds on calibrated scores,
manifest with the recipe, card with the recipe and reliability diagram, atomic swap. So the
F1 in the manifest is what the service will do, not the torch number the search used.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.contract.policy import Policy
from training.data.rows import Example
from training.io import atomic_replace_dir, temp_sibling
from training.merging.params import MergeParams
from training.merging.recipe import MergeRecipe
from training.merging.state import Merger
from training.release.export import TOKENIZER_FILES, ExportSpec
from training.release.finalize import DEFAULT_OPTIONS, ReleaseOptions, release_checkpoint
from training.search.objective import MergeObjective, OutOfSourceSet, load_into
from training.search.run import SearchResult


def winner_recipe(result: SearchResult, params: MergeParams) -> MergeRecipe:
    w = result.winner
    return MergeRecipe(
        method=w["method"], subset=w["type"] or "all", weights=tuple(w["weights"]), params=params, host=0
    )


def save_winner_checkpoint(
    result: SearchResult, objective: MergeObjective, recipe: MergeRecipe, out: Path
) -> list[str]:
    """Rebuild the merged model from its recipe and save it (weights + config + host tokenizer) atomically."""
    merger = Merger(objective.states, recipe.method, recipe.params, base=objective.base, host=recipe.host, cache=False)
    load_into(objective.model, merger.merge(recipe.weights, objective.subsets[recipe.subset]))
    tmp = temp_sibling(out)
    try:
        objective.model.save_pretrained(tmp)
        host = result.top[recipe.host].path
        for fname in TOKENIZER_FILES:
            if (host / fname).exists():
                shutil.copy2(host / fname, tmp / fname)
        atomic_replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return merger.soup_fallback


def export_winner(
    result: SearchResult,
    objective: MergeObjective,
    *,
    params: MergeParams,
    validation_rows: list[Example],
    policies: dict[str, Policy],
    run_dir: Path,
    out_dir: Path,
    name: str,
    creation_command: str,
    trial_log: Path,
    started: float,
    quantize: bool = True,
    options: ReleaseOptions = DEFAULT_OPTIONS,
    heldout: list[Example] | None = None,
    extra_training: dict[str, Any] | None = None,
    card_extra: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Release the winner as ``out_dir``; returns the summary written next to the trial log.

    ``options`` sets the threshold target and scoring threads; the recipe, the training
    record and the card's merge section are the winner's own. ``heldout``: evaluation-only
    rows, passed to the release step (thresholds bounded on their tune half, the card's
    out-of-source table on their test half). ``extra_training``: more of the recipe for the
    manifest (the stages that made the sources); ``card_extra``: Markdown after the recipe.
    """
    win = result.winner
    recipe = winner_recipe(result, params)
    template = (
        objective.templates[win["instruction"]] if win.get("instruction") else next(iter(objective.templates.values()))
    )
    ckpt = run_dir / "winner"
    fallback = save_winner_checkpoint(result, objective, recipe, ckpt)
    single_name, single_f1 = result.best_single
    training = {
        "stage": "merge-search (UniGuard model merging search)",
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.method,
        "type": recipe.subset,
        "weights": {s.name: round(w, 6) for s, w in zip(result.top, recipe.weights, strict=True)},
        "strategy": win["strategy"],
        "iteration": win["iteration"] + 1,
        "instruction": template.model_dump(),
        "sources": [
            {
                "name": s.name,
                "path": str(s.path),
                "family": s.family,
                "policy": s.policy,
                "reported_f1": s.reported_f1,
                "val_f1": result.singles[s.name]["f1"],
            }
            for s in result.top
        ],
        "base": None if result.base is None else str(result.base),
        "soup_fallback_tensors": fallback,
        "val_f1_search": win["f1"],
        "val_rows_search": len(objective.validation.examples),
        "search_objective": "out-of-source summary (held-out tune half)"
        if isinstance(objective.validation, OutOfSourceSet)
        else "validation F1",
        "best_single": {"name": single_name, "val_f1": single_f1},
        "beats_best_single": win["f1"] > single_f1,
        "trial_log": str(trial_log),
        "trials": sum(len(runs) for runs in result.trials.values()),
        **(extra_training or {}),
    }
    recipe_md = (
        "\n## Merge recipe\n\n"
        + "\n".join(
            f"- {k}: `{json.dumps(v, ensure_ascii=False)}`"
            for k, v in training.items()
            if k not in ("recipe", "instruction")
        )
        + "\n"
    )
    release = release_checkpoint(
        ckpt,
        out_dir,
        validation_rows,
        policies,
        export_dir=run_dir / "export",
        spec=ExportSpec(
            name,
            f"UniGuard merge of {', '.join(s.name for s in result.top)}",
            result.max_length,
            result.stride,
            creation_command,
            template,
            quantize=quantize,
            training=training,
        ),
        options=replace(options, train_rows=0, minutes=(time.time() - started) / 60, card_extra=recipe_md + card_extra),
        heldout=heldout,
        progress=progress,
    )
    return {
        "out": str(out_dir),
        "val_f1_service": release.mean_f1,
        "service_precision": release.manifest.files[0].precision,
        "calibration": release.summary(),
        **training,
    }
