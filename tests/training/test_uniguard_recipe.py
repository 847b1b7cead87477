"""``make uniguard`` end to end on a tiny random base: specialists continued from it, the merge search
over their task vectors, the per-policy test-half comparison, the release, promotion, resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from service.contract.policy import DEFAULT_POLICIES_DIR, InputTemplate  # noqa: E402
from training.data.rows import Example, write_examples  # noqa: E402
from training.eval.heldout import HeldoutResult  # noqa: E402
from training.stages.compare import policy_comparison, policy_se, worse_policies  # noqa: E402

PIDS = ("toxicity", "prompt_injection")


def split_rows(pid: str, n: int, tag: str) -> list[Example]:
    return [
        Example(f"{pid} {tag} row {i} " + ("do real harm now" if i % 2 else "a kind question"), i % 2, pid, "src")
        for i in range(n)
    ]


def heldout_rows(pid: str) -> list[Example]:
    """Two held-out sources per policy (one benign, one unsafe), enough rows for cells in both halves."""
    benign = [Example(f"{pid} benign held-out question number {i}", 0, pid, "held-benign") for i in range(48)]
    unsafe = [Example(f"{pid} unsafe held-out request {i} hurt them", 1, pid, "held-unsafe") for i in range(48)]
    return benign + unsafe


@pytest.fixture()
def tiny_base(tmp_path: Path) -> Path:
    """A finished checkpoint of make model's layout: runs/default/checkpoint with its split beside it."""
    from tests.tiny import build_tiny_checkpoint
    from training.model.checkpoints import save_checkpoint
    from training.model.modeling import load_classifier

    raw = build_tiny_checkpoint(tmp_path / "raw", initializer_range=0.2)
    run = tmp_path / "runs" / "default"
    meta = {"family": "default", "policy": None, "trained_policies": list(PIDS), "init": str(raw),
            "input_template": InputTemplate().model_dump(), "max_length": 128, "stride": 32}  # fmt: skip
    save_checkpoint(load_classifier(raw), raw, run / "checkpoint", meta)
    write_examples(run / "train.jsonl", [ex for p in PIDS for ex in split_rows(p, 12, "train")])
    write_examples(run / "validation.jsonl", [ex for p in PIDS for ex in split_rows(p, 8, "val")])
    write_examples(run / "heldout.jsonl", [ex for p in PIDS for ex in heldout_rows(p)])
    return run / "checkpoint"


def test_recipe_specialists_merge_release_and_resume(tiny_base: Path, tmp_path: Path) -> None:
    from service.model.manifest import read_manifest
    from training.stages.uniguard import UniGuardConfig, build_uniguard
    from training.ui import Reporter

    policies = tmp_path / "policies"
    policies.mkdir()
    for pid in PIDS:
        shutil.copy2(DEFAULT_POLICIES_DIR / f"{pid}.yaml", policies / f"{pid}.yaml")
    (tmp_path / "data").mkdir()
    run, out = tmp_path / "runs" / "uniguard", tmp_path / "models" / "default"
    cfg = UniGuardConfig(base=str(tiny_base), specialist_steps=(1, 2), batch_size=4, precision="fp32", max_length=128,
                         stride=32, methods=("ties", "soup"), subsets=("all", "no_head"), iterations=2,
                         search_rows=16, heldout_per_cell=12, compare_per_cell=20, stage_validation_rows=4,
                         threads=1, min_parity=None)  # fmt: skip

    def build() -> dict:
        return build_uniguard(tmp_path / "data", tmp_path / "examples", policies, out, run, cfg,
                              reporter=Reporter(enabled=False))  # fmt: skip

    summary = build()
    merge = run / "merge-1+2"
    # the base's own split, copied; one specialist per policy, continued from the base
    assert (run / "train.jsonl").read_text() == (tiny_base.parent / "train.jsonl").read_text()
    # one specialist per policy and budget, each continued from the base
    for pid in PIDS:
        for steps in (1, 2):
            meta = json.loads((run / f"specialists-{steps}" / pid / "fft" / "uniguard.json").read_text())
            assert meta["init"] == str(tiny_base) and meta["family"] == "specialist-fft" and meta["policy"] == pid
            assert meta["config"]["windows"] is True and meta["train_log"][-1]["step"] == steps
        assert meta["input_template"] == InputTemplate().model_dump()
    # the search merged task vectors against the base; the release records the recipe
    manifest = read_manifest(merge / "release")
    training = manifest.training
    assert training["base"] == str(tiny_base) and training["method"] in ("ties", "soup")
    budgets = {str(run / f"specialists-{n}" / p / "fft") for p in PIDS for n in (1, 2)}
    assert {s["path"] for s in training["sources"]} <= budgets | {str(tiny_base)}
    assert set(training["weights"]) == {s["name"] for s in training["sources"]}
    assert training["test_half_reference"] == "base" and "merged" in training["test_half_comparison"]
    compared = set(training["test_half_comparison"])
    assert {"base", "merged"} <= compared
    assert all(k.startswith("specialist-fft/") for k in compared - {"base", "merged"})
    assert manifest.threshold_target == {"kind": "levels"} and "heldout_levels" in training
    table = (merge / "comparison.md").read_text()
    assert "| toxicity | base |" in table and "| toxicity | merged |" in table and "Δ vs base" in table
    assert "Per policy at `balanced`" in (merge / "release" / "CARD.md").read_text()
    stages = json.loads((run / "stages.json").read_text())
    assert {"data", "specialists (1 steps each)", "specialists (2 steps each)"} <= set(stages)
    assert {"merge search (1+2 steps)", "release (1+2 steps)"} <= set(stages)
    assert summary["promoted"] == out.exists()
    assert summary["promoted"] == (
        training["beats_reference_test_half"] and not training["policies_worse_beyond_noise"]
    )

    # a rerun resumes: no specialist retrains, no trial is scored again
    stamp = (run / "specialists-2" / "toxicity" / "fft" / "model.safetensors").stat().st_mtime_ns
    trials = (merge / "trials.jsonl").read_text()
    build()
    assert (run / "specialists-2" / "toxicity" / "fft" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (merge / "trials.jsonl").read_text() == trials


def test_recipe_refuses_an_unfinished_base(tmp_path: Path) -> None:
    from training.stages.uniguard import UniGuardConfig, build_uniguard

    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="not a finished checkpoint"):
        build_uniguard(tmp_path / "data", tmp_path, DEFAULT_POLICIES_DIR, tmp_path / "out", tmp_path / "run",
                       UniGuardConfig(base=str(tmp_path / "nothing")))  # fmt: skip


def result(pid_cells: dict[str, list[tuple[int, float, int]]]) -> HeldoutResult:
    """A held-out result from (label, recall-or-fpr, n) cells per policy."""
    from training.eval.heldout import balanced_score

    cells, policies = [], {}
    for pid, cs in pid_cells.items():
        for i, (label, v, n) in enumerate(cs):
            cells.append({"policy": pid, "source": f"s{i}", "label": label, "n": n,
                          **({"recall": v} if label else {"fpr": v})})  # fmt: skip
        rec = [v for label, v, _ in cs if label]
        fpr = [v for label, v, _ in cs if not label]
        policies[pid] = {"threshold": 0.5, "balanced": balanced_score(rec, fpr), "recall": sum(rec) / len(rec),
                         "pooled_fpr": sum(fpr) / len(fpr), "max_source_fpr": max(fpr), "roc_auc": 0.9,
                         "near_threshold": 0.0}  # fmt: skip
    summary = sum(p["balanced"] for p in policies.values()) / len(policies)
    return HeldoutResult({}, cells, summary, [], 0, policies)


def test_worse_only_beyond_the_noise_of_the_cells() -> None:
    base = result({"a": [(1, 0.80, 400), (0, 0.05, 400)], "b": [(1, 0.80, 20), (0, 0.05, 20)]})
    merged = result({"a": [(1, 0.70, 400), (0, 0.05, 400)], "b": [(1, 0.70, 20), (0, 0.05, 20)]})
    # the same drop (0.05 balanced) is beyond noise on 400-row cells, within it on 20-row cells
    assert worse_policies(merged, base) == {"a": 0.05}
    assert policy_se(base, "a") == pytest.approx(0.5 * ((0.8 * 0.2 / 400) + (0.05 * 0.95 / 400)) ** 0.5)
    table = policy_comparison({"base": base, "merged": merged}, base="base")
    assert "| a | merged | 0.8250 ± " in table and "| -0.0500 |" in table and "| base | **0.8750** |" in table
