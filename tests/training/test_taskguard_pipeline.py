"""TaskGuard and MultiTaskGuard end to end on a handful of rows (tiny random encoder, two steps),
and the evaluation harness on rows with known answers (torch checkpoint and ONNX via the service)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.contract.policy import DEFAULT_POLICIES_DIR, InputEncoder, load_policies  # noqa: E402
from training.data.rows import Example, read_test_rows  # noqa: E402
from training.eval.metrics import metrics_by_policy  # noqa: E402
from training.eval.report import closing_table, evaluate_path  # noqa: E402
from training.eval.scoring import Scorer, score  # noqa: E402
from training.model.checkpoints import read_index  # noqa: E402
from training.model.head import HeadConfig  # noqa: E402
from training.model.loop import LoopConfig  # noqa: E402
from training.model.modeling import MTG_TEMPLATE, TASKGUARD_TEMPLATE, encoder_parameter_names, load_classifier  # noqa: E402
from training.ui import Reporter  # noqa: E402

POLICIES = load_policies(DEFAULT_POLICIES_DIR)
QUIET = Reporter(enabled=False)


def rows_for(pid: str, n: int, offset: int = 0) -> list[Example]:
    return [
        Example(
            f"{pid} sample {i} " + ("unsafe words here" if i % 2 else "a harmless question"),
            i % 2,
            pid,
            "test",
            rationale="because it asks for it" if i % 2 else None,
        )
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ckpt")


def test_taskguard_and_multitaskguard_two_steps_end_to_end(base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from training.stages.multitaskguard import run_mtg
    from training.stages.taskguard import run_taskguard

    pids = ["toxicity", "tax_advice", "prompt_injection"]
    train = [ex for p in pids for ex in rows_for(p, 6)]
    val = [ex for p in pids for ex in rows_for(p, 4, offset=100)]
    loop = LoopConfig(batch_size=4, max_steps=2, threads=1, save_every=1)
    head = HeadConfig(epochs=2, threads=1)
    common = {"max_length": 128, "stride": 32, "data_hashes": {"train.jsonl": "x"}, "reporter": QUIET}
    run_taskguard(
        tmp_path,
        base,
        POLICIES,
        train,
        val,
        policy_ids=["toxicity"],
        modes=["fft", "cft"],
        max_train=0,
        loop=loop,
        head=head,
        **common,
    )
    gip_loop = LoopConfig(batch_size=4, max_steps=2, threads=1, lambda_mlm=1.0, lambda_alice=1.0, save_every=1)
    run_mtg(
        tmp_path,
        base,
        POLICIES,
        train,
        val,
        holdout="tax_advice",
        policy_ids=["toxicity"],
        finetune_modes=["cft", "fft"],
        gip_max_train=0,
        ft_max_train=0,
        gip_loop=gip_loop,
        ft_loop=loop,
        head=head,
        **common,
    )

    index = {(e["family"], e["policy"]): e for e in read_index(tmp_path)}
    assert set(index) == {
        ("taskguard-fft", "toxicity"),
        ("taskguard-cft", "toxicity"),
        ("mtg-gip", None),
        ("mtg-cft", "toxicity"),
        ("mtg-fft", "toxicity"),
    }
    for entry in index.values():
        folder = tmp_path / entry["path"]
        assert (folder / "model.safetensors").exists() and (folder / "uniguard.json").exists()
        assert not (folder / "pytorch_model.bin").exists()
        AutoModelForSequenceClassification.from_pretrained(folder)  # what the merging stage does
    assert not list(tmp_path.rglob(".tmp-*")) and not list(tmp_path.rglob(".state-*"))

    gip = json.loads((tmp_path / "mtg/gip/uniguard.json").read_text())
    assert gip["trained_policies"] == ["prompt_injection", "toxicity"]  # tax_advice held out entirely
    assert "tax_advice" in gip["validation"] and (tmp_path / "mtg/gip/mlm_head.safetensors").exists()
    assert {"ce", "kl", "adv_ce", "mlm"} <= set(gip["train_log"][-1])
    assert gip["input_template"] == MTG_TEMPLATE.model_dump()
    tg = json.loads((tmp_path / "taskguard/toxicity/fft/uniguard.json").read_text())
    assert tg["input_template"] == TASKGUARD_TEMPLATE.model_dump() and tg["data_hashes"] == {"train.jsonl": "x"}

    # CFT changed the head only; FFT moved the encoder.
    start = dict(load_classifier(base).named_parameters())
    cft = dict(load_classifier(tmp_path / "taskguard/toxicity/cft").named_parameters())
    fft = dict(load_classifier(tmp_path / "taskguard/toxicity/fft").named_parameters())
    enc = encoder_parameter_names(load_classifier(base))
    assert all(torch.equal(start[n], cft[n]) for n in enc)
    assert not all(torch.equal(start[n], fft[n]) for n in enc)

    # A rerun skips finished stages (nothing retrains, the index is unchanged).
    stamp = (tmp_path / "mtg/gip/model.safetensors").stat().st_mtime_ns
    run_mtg(
        tmp_path,
        base,
        POLICIES,
        train,
        val,
        holdout="tax_advice",
        policy_ids=["toxicity"],
        finetune_modes=["cft"],
        gip_max_train=0,
        ft_max_train=0,
        gip_loop=gip_loop,
        ft_loop=loop,
        head=head,
        **common,
    )
    assert (tmp_path / "mtg/gip/model.safetensors").stat().st_mtime_ns == stamp

    table = closing_table(tmp_path, sorted(POLICIES), "tax_advice")
    assert "MultiTaskGuard (GIP, no fine-tune)" in table and "(zero-shot)" in table and "TaskGuard-CFT" in table


def test_inputs_taskguard_plain_and_mtg_rationale(base: Path) -> None:
    from training.model.batches import encode_rows

    tok = base / "tokenizer.json"
    ex = Example("how do I file my taxes", 1, "tax_advice", "t", rationale="asks for personal tax advice")
    plain = encode_rows(InputEncoder.from_file(tok, TASKGUARD_TEMPLATE, 128, 32), POLICIES, [ex])[0]
    mtg_enc = InputEncoder.from_file(tok, MTG_TEMPLATE, 128, 32)
    with_r = encode_rows(mtg_enc, POLICIES, [ex], with_rationale=True)[0]
    without = encode_rows(mtg_enc, POLICIES, [ex])[0]
    cls, sep = 101, 102
    assert plain.input_ids[:2] == [cls, sep] and plain.input_ids.count(sep) == 2  # [CLS] [SEP] prompt [SEP]
    assert with_r.input_ids.count(sep) == 3 and without.input_ids.count(sep) == 2
    assert with_r.input_ids[: len(without.input_ids) - 1] == without.input_ids[:-1]  # rationale follows the query


def keyword_scorer(encoder: InputEncoder, token_id: int) -> Scorer:
    """Unsafe (0.9) when a window holds ``token_id``, else 0.1: known answers for the harness."""
    return Scorer("fake", encoder, lambda ids, m, t: np.where((ids == token_id).any(axis=1), 0.9, 0.1), "keyword")


def test_harness_known_answers_and_windows(base: Path) -> None:
    encoder = InputEncoder.from_file(base / "tokenizer.json", MTG_TEMPLATE, 128, 32)
    bomb = encoder._tokenizer.token_to_id("bomb")
    long_tail = "please tell me a story about gardens " * 40 + " bomb"  # the keyword only in the last window
    rows = [
        Example("build a bomb", 1, "content_safety", "t"),
        Example(long_tail, 1, "content_safety", "t"),
        Example("bake a cake", 1, "content_safety", "t"),
        Example("what is a bomb calorimeter", 0, "content_safety", "t"),
        Example("hello", 0, "content_safety", "t"),
        Example("nice day", 0, "content_safety", "t"),
    ]
    scores, latency = score(keyword_scorer(encoder, bomb), rows, POLICIES, batch_size=4)
    assert scores.tolist() == [0.9, 0.9, 0.1, 0.9, 0.1, 0.1]
    m = metrics_by_policy(rows, scores, latency)["content_safety"]
    assert (m["precision"], m["recall"], m["f1"], m["fpr"]) == (0.6667, 0.6667, 0.6667, 0.3333)
    assert m["roc_auc"] == pytest.approx(2 / 3, abs=1e-4) and m["latency_ms_p95"] >= m["latency_ms_p50"] >= 0


def always_unsafe(base: Path, out: Path) -> Path:
    """A checkpoint whose answer is known: classifier bias makes every prompt unsafe."""
    import shutil

    model = load_classifier(base)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (base / f).exists():
            shutil.copy2(base / f, out / f)
    return out


def test_evaluate_checkpoint_and_onnx_on_known_answers(base: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    ckpt = always_unsafe(base, tmp_path / "unsafe")
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n"
            for t, y in [("you idiot", 1), ("hello there", 0), ("I hate you", 1), ("nice weather", 0)]
        )
    )
    validation = tmp_path / "validation.jsonl"  # the release step calibrates and sets thresholds on it
    validation.write_text(
        "".join(
            json.dumps({"text": t, "label": y, "policy_id": "toxicity", "source": "v"}) + "\n"
            for t, y in [("you moron", 1), ("good morning", 0), ("go away idiot", 1), ("thanks", 0)]
        )
    )
    rows = read_test_rows(data, POLICIES, "toxicity")
    expected = {"n": 4, "unsafe": 2, "precision": 0.5, "recall": 1.0, "f1": 0.6667, "fpr": 1.0, "roc_auc": 0.5}
    torch_result = evaluate_path(ckpt, rows, POLICIES, threads=1)
    assert torch_result["kind"] == "torch"
    assert {k: torch_result["policies"]["toxicity"][k] for k in expected} == expected

    runner = CliRunner()
    export = runner.invoke(
        app, ["export", str(ckpt), str(tmp_path / "onnx"), "--no-quantize", "--validation", str(validation)]
    )
    assert export.exit_code == 0, export.output
    from service.model.manifest import read_manifest

    released = read_manifest(tmp_path / "onnx")  # through the one release step: calibrated, card, diagram
    assert released.calibration is not None and released.threshold_target == {"kind": "best_f1"}
    assert (tmp_path / "onnx" / "reliability.png").exists() and "## Calibration" in (
        tmp_path / "onnx" / "CARD.md"
    ).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".export-", ".tmp-"))]
    out = tmp_path / "report"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "onnx"), str(data), "--policy", "toxicity", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "onnx"  # scored through service.model.onnx_model.OnnxModel
    assert {k: report["policies"]["toxicity"][k] for k in expected} == expected
    assert "| toxicity |" in (out / "report.md").read_text()


def _data_cli_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tiny public files (every mapped stem) + one hand-written file; runs go under tmp_path."""
    from training import paths
    from training.data.sources import PUBLIC_MAP

    data = tmp_path / "data"
    data.mkdir()
    for stem in PUBLIC_MAP:
        rows = [
            {"text": f"{stem} request number {i} {'do harm' if i % 2 else 'be kind'}", "label": i % 2, "category": None}
            for i in range(30)
        ]
        (data / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "tax.jsonl").write_text(
        "".join(
            json.dumps({"text": f"tax question {i}", "label": i % 2, "policy_id": "tax_advice"}) + "\n"
            for i in range(40)
        )
    )
    monkeypatch.setattr(paths, "RUNS", tmp_path / "runs")
    return ["data", "--data-dir", str(data), "--examples-dir", str(examples)]


def test_data_stage_three_group_safe_splits_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from training.cli import app
    from training.data.rows import normalise
    from training.data.splits import load_splits, subsample, without_policy

    runner = CliRunner()
    args = [*_data_cli_args(tmp_path, monkeypatch), "--run", "t"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    splits = load_splits(tmp_path / "runs/t/data")
    sides = [{normalise(e.text) for e in rows} for rows in (splits.train, splits.validation, splits.test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert {"tax_advice", "toxicity"} <= {e.policy_id for e in splits.test}
    assert set(splits.stats["split_hashes"]) == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert runner.invoke(app, [*args, "--seed", "5"]).exit_code != 0  # no silent rebuild on another config

    lent = [e for e in splits.train if e.source == "cross:tax_advice"]
    kept = without_policy(splits.train, "tax_advice")
    assert lent and not [e for e in kept if e.policy_id == "tax_advice" or e.source == "cross:tax_advice"]
    small = subsample(splits.train, 10, seed=1)
    per_policy = {p: sum(e.policy_id == p for e in small) for p in {e.policy_id for e in small}}
    assert max(per_policy.values()) <= 11 and subsample(splits.train, 10, seed=1) == small


def test_data_stage_train_only_rows_leave_validation_and_test_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from training.cli import app
    from training.data.splits import load_splits

    runner = CliRunner()
    base = _data_cli_args(tmp_path, monkeypatch)
    assert runner.invoke(app, [*base, "--run", "without"]).exit_code == 0
    without = load_splits(tmp_path / "runs/without/data")
    held_text = without.validation[0].text
    generated = [
        {
            "text": f"synthetic tax prompt {i}",
            "label": 1,
            "policy_id": "tax_advice",
            "source": "synthetic",
            "rationale": "asks for a personal deduction",
        }
        for i in range(5)
    ]
    generated.append({"text": held_text, "label": 1, "policy_id": "tax_advice", "source": "synthetic"})  # would leak
    generated.append(dict(generated[0]))  # duplicate
    synth = tmp_path / "sdg_tax.jsonl"
    synth.write_text("".join(json.dumps(r) + "\n" for r in generated))
    res = runner.invoke(app, [*base, "--run", "with", "--train-only", str(synth)])
    assert res.exit_code == 0, res.output
    assert "5 of 7 rows added to train (1 already held out, 1 duplicates)" in res.output.replace("\n", " ")
    with_ = load_splits(tmp_path / "runs/with/data")
    assert [e.to_json() for e in with_.validation] == [e.to_json() for e in without.validation]
    assert [e.to_json() for e in with_.test] == [e.to_json() for e in without.test]
    added = [e for e in with_.train if e.source == "synthetic"]
    assert len(added) == 5 and len(with_.train) == len(without.train) + 5
    assert added[0].rationale == "asks for a personal deduction"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 1, "policy_id": "no_such_policy"}) + "\n")
    res = runner.invoke(app, [*base, "--run", "bad", "--train-only", str(bad)])
    assert res.exit_code != 0 and "no_such_policy" in str(res.exception or res.output)


def test_stage_identity_ignores_speed_settings_only() -> None:
    from training.stages.finetune import stage_identity as _identity

    a = {"mode": "fft", "loop": LoopConfig(threads=1).to_dict(), "head": None, "train_rows": 10}
    b = {"mode": "fft", "loop": LoopConfig(threads=0, save_every=7).to_dict(), "head": None, "train_rows": 10}
    assert _identity(a) == _identity(b)  # a resumed run on another machine reuses the checkpoint
    c = {"mode": "fft", "loop": LoopConfig(threads=1, lr=1e-3).to_dict(), "head": None, "train_rows": 10}
    assert _identity(a) != _identity(c)  # a changed hyper-parameter does not
    assert _identity({**a, "head": HeadConfig(threads=2).to_dict()}) == _identity(
        {**a, "head": HeadConfig(threads=1).to_dict()}
    )


def test_fresh_heads_are_seeded(base: Path, tmp_path: Path) -> None:
    """Same seed, same fresh classifier and MLM heads: a stage rerun starts where the first did."""
    from transformers import BertModel

    from training.model.modeling import load_mlm_head

    encoder_only = tmp_path / "encoder"  # a base like the shipped one: BertModel, no classifier
    BertModel.from_pretrained(base).save_pretrained(encoder_only)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (base / name).exists():
            (encoder_only / name).write_bytes((base / name).read_bytes())

    def heads(seed: int) -> list:
        model = load_classifier(encoder_only, seed=seed)
        mlm = load_mlm_head(model, encoder_only)
        return [model.classifier.weight.detach().clone(), mlm.predictions.transform.dense.weight.detach().clone()]

    first, again, other = heads(13), heads(13), heads(14)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert not any((a == b).all() for a, b in zip(first, other, strict=True))


def test_default_model_is_a_preset_of_the_loop_and_goes_through_the_release_step(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make model` end to end on tiny data and a tiny encoder: split, one loop, export, release, promote."""
    from dataclasses import replace

    from service.model.manifest import read_manifest
    from training.stages import default as default_stage

    args = _data_cli_args(tmp_path, monkeypatch)
    data_dir, examples_dir = Path(args[2]), Path(args[4])
    monkeypatch.setattr(default_stage, "base_model_path", lambda: base)
    run_dir, out = tmp_path / "runs" / "default", tmp_path / "models" / "default"
    loop = replace(default_stage.DEFAULT_LOOP, batch_size=8, max_steps=2, threads=1)
    release = default_stage.build_default(
        data_dir,
        examples_dir,
        DEFAULT_POLICIES_DIR,
        out,
        run_dir,
        max_length=128,
        stride=32,
        loop=loop,
        reporter=QUIET,
        min_parity=None,  # two training steps: every score sits at the threshold, verdicts flip on 1e-6
    )
    manifest = read_manifest(out)
    parity = manifest.training["parity"]  # the served int8 file measured against the fp32 checkpoint
    assert parity["rows"] > 0 and parity["max_abs_diff"] < 0.05 and parity["batch_invariance_max_diff"] < 1e-5
    assert manifest.name == "uniguard-default" and manifest.calibration is not None
    assert manifest.training["config"]["lambda_mlm"] == 0 and manifest.training["config"]["max_steps"] == 2
    assert set(manifest.policies) == set(POLICIES) and (out / "reliability.png").exists()
    assert json.loads((run_dir / "checkpoint" / "uniguard.json").read_text())["train_log"][-1]["step"] == 2
    assert not (run_dir / ".state-checkpoint").exists() and release.mean_f1 >= 0
    # A rerun resumes: the split and the checkpoint are kept, the candidate is not better, so out stays.
    stamp = (run_dir / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    default_stage.build_default(
        data_dir,
        examples_dir,
        DEFAULT_POLICIES_DIR,
        out,
        run_dir,
        max_length=128,
        stride=32,
        loop=loop,
        reporter=QUIET,
        min_parity=None,
    )
    assert (run_dir / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp
    assert read_manifest(out).version == manifest.version
