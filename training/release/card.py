"""The model card written next to every released model (CARD.md)."""

from __future__ import annotations

from typing import Any

from service.model.manifest import Manifest
from training.ui import cell as _f


def render_card(
    manifest: Manifest,
    rep: dict[str, dict[str, Any]],
    *,
    validation_rows: int,
    train_rows: int,
    minutes: float | None,
    calibration: str | None = None,
) -> str:
    """``calibration``: the section ``training.release.calibrate.card_section`` renders (diagram, ECE)."""
    lines = [
        f"# {manifest.name}@{manifest.version}",
        "",
        "One multi-policy instruction classifier: the input is the tokenizer pair",
        f"`{manifest.input_template.instruction}` [SEP] `{manifest.input_template.query}`, "
        f"max {manifest.max_length} tokens per window, windows overlap by {manifest.stride} tokens; "
        "a prompt's score is its most unsafe window.",
        "",
        f"- Base encoder: {manifest.base_model}",
        f"- Format: ONNX ({manifest.files[0].precision}), onnxruntime on CPU",
        f"- Training rows: {train_rows or 'none of its own (a merge of trained checkpoints: see the recipe)'}; "
        f"validation rows: {validation_rows} (stratified by policy, source and label; "
        "every copy of a text on one side)",
        f"- Built by: `{manifest.creation_command}`" + (f" in {minutes:.1f} min on CPU" if minutes is not None else ""),
        "",
        "## Validation per policy",
        "",
        *(
            [
                "Thresholds are the lowest whose false-positive rate on the validation split is at most "
                f"{(manifest.threshold_target or {}).get('max_fpr')}, with every source weighted equally, so that a"
            ]
            if (manifest.threshold_target or {}).get("kind") == "max_fpr"
            else [
                "Thresholds are the held-out sensitivity levels (see Out of source); the figures below are the "
                "`balanced` level's on the validation split, with every source weighted equally, so that a"
            ]
            if (manifest.threshold_target or {}).get("kind") == "levels"
            else ["Thresholds maximise F1 on the validation split with every source weighted equally, so that a"]
        ),
        "large source (long jailbreak dumps, Alpaca) does not set a policy's threshold alone."
        + (" Scores and thresholds are calibrated (see Calibration)." if manifest.calibration is not None else ""),
        "",
        "| policy | threshold | n | unsafe | precision | recall | F1 | FPR | ROC-AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pid, e in rep.items():
        o = e["overall"]
        lines.append(
            f"| {pid} | {e['threshold']:.3f} | {o['n']} | {o['unsafe']} | {_f(o['precision'])} | {_f(o['recall'])} | "
            f"{_f(o['f1'])} | {_f(o['fpr'])} | {_f(o['roc_auc'])} |"
        )
    lines += [
        "",
        "## Validation per source",
        "",
        "Recall on unsafe-only sources, false-positive rate on safe-only ones; `benign:*` are safe rows of",
        "general files lent to a policy, `cross:*` are unsafe prompts of another policy that are safe under this one.",
        "",
        "| policy | source | n | unsafe | recall | FPR | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for pid, e in rep.items():
        for src, s in e["by_source"].items():
            lines.append(
                f"| {pid} | {src} | {s['n']} | {s['unsafe']} | {_f(s['recall'])} | {_f(s['fpr'])} | {_f(s['f1'])} |"
            )
    if calibration:
        lines += ["", calibration.rstrip("\n")]
    lines += [
        "",
        "## Limits",
        "",
        "- Validation rows come from the same sources as training: public benchmark copies and the project's",
        "  hand-written examples. Scores on other distributions will be lower; treat these as an upper bound.",
        "- `financial_advice` and `tax_advice` have no public data: they are learnt from hand-written examples",
        "  (and 30 forbidden-questions rows for financial advice), so their validation set is small.",
        "- English first; German and a few other languages appear only in the prompt-injection data and",
        "  the hand-written examples.",
        "",
    ]
    return "\n".join(lines)
