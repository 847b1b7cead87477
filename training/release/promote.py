"""Replace a served folder (``models/default``) only by a model that is better on its policies.

With held-out rows (``score``: a folder's out-of-source summary, ``training.eval.heldout``)
both folders are scored on the same held-out test rows at their own thresholds and the
higher summary wins: in-source validation never decides alone. Without them, both means of
validation F1 are taken over the policies the current folder was validated on; a candidate
validated on fewer policies (a per-policy merge) never replaces a multi-policy default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from service.model.manifest import MANIFEST_FILE, Manifest, read_manifest
from training.io import copy_tree_atomic


def mean_validation_f1(manifest: Manifest, policy_ids: list[str]) -> float | None:
    """Mean validation F1 of ``policy_ids``; None when one of them has no F1 in ``manifest``."""
    values = []
    for pid in policy_ids:
        entry = manifest.policies.get(pid)
        if entry is None or entry.validation is None or entry.validation.f1 is None:
            return None
        values.append(entry.validation.f1)
    return sum(values) / len(values) if values else 0.0


def promote(
    candidate: Path, target: Path, *, force: bool = False, score: Callable[[Path], float | None] | None = None
) -> tuple[bool, str]:
    """Copy ``candidate`` over ``target`` atomically if it is better there (or ``force``); (done, why)."""
    candidate, target = Path(candidate), Path(target)
    if not (target / MANIFEST_FILE).exists():
        copy_tree_atomic(candidate, target)
        return True, f"{target} did not exist"
    if force:
        copy_tree_atomic(candidate, target)
        return True, "forced"
    if score is not None:
        new, old_score = score(candidate), score(target)
        if new is None:
            return False, "the candidate has no out-of-source summary"
        if old_score is not None and new <= old_score:
            return False, f"{target.name} out-of-source summary {old_score:.4f} >= candidate {new:.4f}"
        copy_tree_atomic(candidate, target)
        return True, f"out-of-source summary: candidate {new:.4f} > {target.name} {old_score}"
    old = read_manifest(target)
    pids = [pid for pid, p in old.policies.items() if p.validation and p.validation.f1 is not None]
    if not pids:
        copy_tree_atomic(candidate, target)
        return True, f"{target} records no validation F1 to beat"
    new_f1 = mean_validation_f1(read_manifest(candidate), pids)
    if new_f1 is None:
        return False, f"the candidate is not validated on all of {pids}, which {target.name} covers"
    old_f1 = mean_validation_f1(old, pids) or 0.0
    if new_f1 <= old_f1:
        return False, f"{target.name} mean validation F1 {old_f1:.4f} >= candidate {new_f1:.4f}"
    copy_tree_atomic(candidate, target)
    return True, f"candidate {new_f1:.4f} > {target.name} {old_f1:.4f}"
