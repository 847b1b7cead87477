"""Write the search's winner as a model folder the service loads, with its recipe in the manifest.

The merged weights are rebuilt from the recipe (not kept from the search), saved as a
transformers checkpoint, exported by ``training.export.export_model_folder`` (ONNX, int8,
atomic) and then calibrated the way the default model is: every validation row scored
through the service's own loader, per-policy thresholds chosen with sources weighted equally.
So the F1 in the manifest is what the service will do, not the torch number the search used.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from service.manifest import MANIFEST_FILE, PolicyEntry, read_manifest
from service.policy import Policy
from training.card import render_card
from training.data import Example
from training.evaluate import choose_thresholds, report, score_examples
from training.export import TOKENIZER_FILES, atomic_replace_dir, export_model_folder, write_json_atomic
from training.merging.config import MergeParams, MergeRecipe
from training.merging.state import Merger
from training.search.objective import MergeObjective, load_into
from training.search.run import SearchResult


def winner_recipe(result: SearchResult, params: MergeParams) -> MergeRecipe:
    w = result.winner
    return MergeRecipe(method=w["method"], subset=w["type"] or "all", weights=tuple(w["weights"]), params=params, host=0)


def mean_f1(rep: dict[str, dict]) -> float:
    vals = [e["overall"]["f1"] for e in rep.values() if e["overall"].get("f1") is not None]
    return sum(vals) / len(vals) if vals else 0.0


def save_winner_checkpoint(result: SearchResult, objective: MergeObjective, recipe: MergeRecipe, out: Path) -> list[str]:
    """Rebuild the merged model from its recipe and save it (weights + config + host tokenizer) atomically."""
    merger = Merger(objective.states, recipe.method, recipe.params, base=objective.base, host=recipe.host, cache=False)
    load_into(objective.model, merger.merge(recipe.weights, objective.subsets[recipe.subset]))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    objective.model.save_pretrained(tmp)
    host = result.top[recipe.host].path
    for fname in TOKENIZER_FILES:
        if (host / fname).exists():
            shutil.copy2(host / fname, tmp / fname)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return merger.soup_fallback


def export_winner(result: SearchResult, objective: MergeObjective, *, params: MergeParams, validation_rows: list[Example],
                  policies: dict[str, Policy], run_dir: Path, out_dir: Path, name: str, base_model: str, base_path: Path | None,
                  max_length: int, stride: int, creation_command: str, trial_log: Path, started: float,
                  quantize: bool = True) -> dict[str, Any]:
    """Export the winner to ``out_dir``; returns the summary written next to the trial log."""
    win = result.winner
    recipe = winner_recipe(result, params)
    template = objective.templates[win["instruction"]] if win.get("instruction") else next(iter(objective.templates.values()))
    ckpt = run_dir / "winner"
    fallback = save_winner_checkpoint(result, objective, recipe, ckpt)
    single_name, single_f1 = result.best_single
    training = {
        "stage": "merge-search (UniGuard model merging search)",
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.method, "type": recipe.subset,
        "weights": {s.name: round(w, 6) for s, w in zip(result.top, recipe.weights)},
        "strategy": win["strategy"], "iteration": win["iteration"] + 1,
        "instruction": template.model_dump(),
        "sources": [{"name": s.name, "path": str(s.path), "family": s.family, "policy": s.policy, "reported_f1": s.reported_f1,
                     "val_f1": result.singles[s.name]["f1"]} for s in result.top],
        "base": None if base_path is None else str(base_path),
        "soup_fallback_tensors": fallback,
        "val_f1_search": win["f1"], "val_rows_search": len(objective.validation.examples),
        "best_single": {"name": single_name, "val_f1": single_f1}, "beats_best_single": win["f1"] > single_f1,
        "trial_log": str(trial_log),
    }
    export_dir = run_dir / "export"
    export_model_folder(ckpt, export_dir, name=name, base_model=base_model, max_length=max_length, stride=stride,
                        creation_command=creation_command, training=training, quantize=quantize)
    # The instruction template is part of the recipe: in the manifest before the service scores anything.
    manifest = read_manifest(export_dir)
    manifest.input_template = template
    write_json_atomic(export_dir / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
    scores, latency = score_examples(export_dir, validation_rows, policies)
    thresholds = choose_thresholds(validation_rows, scores)
    rep = report(validation_rows, scores, thresholds)
    for pid, entry in rep.items():
        manifest.policies[pid] = PolicyEntry.model_validate({
            "threshold": thresholds.get(pid, manifest.default_threshold),
            "description_sha256": policies[pid].description_sha256(),
            "validation": entry["overall"], "validation_by_source": entry["by_source"],
        })
    manifest.training["val_f1_service"] = round(mean_f1(rep), 6)
    manifest.training["service_precision"] = manifest.files[0].precision
    manifest = type(manifest).model_validate(manifest.model_dump())
    write_json_atomic(export_dir / MANIFEST_FILE, json.loads(manifest.model_dump_json()))
    card = render_card(manifest, rep, validation_rows=len(validation_rows), train_rows=0,
                       minutes=(time.time() - started) / 60)
    card += "\n## Merge recipe\n\n" + "\n".join(
        f"- {k}: `{json.dumps(v, ensure_ascii=False)}`" for k, v in training.items() if k not in ("recipe", "instruction")) + "\n"
    (export_dir / "CARD.md").write_text(card, encoding="utf-8")
    staging = out_dir.with_name(f".tmp-{out_dir.name}-{int(time.time())}")
    shutil.copytree(export_dir, staging)
    atomic_replace_dir(staging, out_dir)
    return {"out": str(out_dir), "val_f1_service": mean_f1(rep), "service_precision": manifest.files[0].precision, **training}


def maybe_promote(out_dir: Path, default_dir: Path) -> tuple[bool, str]:
    """Copy ``out_dir`` over the shipped default only if it is better on the default's own policies.

    Both means are taken over the policies the default was validated on; a merge validated on
    fewer policies (a per-policy UniGuard) never replaces a multi-policy default.
    """
    new = read_manifest(out_dir)
    if not (default_dir / MANIFEST_FILE).exists():
        staging = default_dir.with_name(f".tmp-{default_dir.name}-{int(time.time())}")
        shutil.copytree(out_dir, staging)
        atomic_replace_dir(staging, default_dir)
        return True, "no default model existed"
    old = read_manifest(default_dir)
    pids = [pid for pid, p in old.policies.items() if p.validation and p.validation.f1 is not None]
    missing = [pid for pid in pids if not (new.policies.get(pid) and new.policies[pid].validation
                                           and new.policies[pid].validation.f1 is not None)]
    if missing:
        return False, f"the merge is not validated on {missing}, which the default covers"
    old_f1 = sum(old.policies[p].validation.f1 for p in pids) / max(1, len(pids))  # type: ignore[union-attr]
    new_f1 = sum(new.policies[p].validation.f1 for p in pids) / max(1, len(pids))  # type: ignore[union-attr]
    if new_f1 <= old_f1:
        return False, f"default mean validation F1 {old_f1:.4f} >= merge {new_f1:.4f}"
    staging = default_dir.with_name(f".tmp-{default_dir.name}-{int(time.time())}")
    shutil.copytree(out_dir, staging)
    atomic_replace_dir(staging, default_dir)
    return True, f"merge {new_f1:.4f} > default {old_f1:.4f}"
