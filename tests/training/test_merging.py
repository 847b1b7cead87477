"""Merge methods as properties on small tensors, and subsets on a tiny BERT state dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.merging import (
    BUILTIN_SUBSETS,
    MergeParams,
    Merger,
    MergeRecipe,
    get_method,
    load_subsets,
    merge_state_dicts,
)
from training.merging.checkpoints import common_base, resolve_sources
from training.merging.methods import drop_and_rescale, pair_and_t, sign_consensus_mean, slerp

P = MergeParams()


def models(n: int = 3, shape: tuple[int, ...] = (4, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["soup", "ties", "dare_linear", "dare_ties", "slerp"])
def test_one_hot_weights_return_that_model(method: str) -> None:
    xs = models()
    base = torch.randn(4, 5)
    params = MergeParams(density=1.0, drop_rate=0.0)
    for i in range(3):
        w = torch.zeros(3)
        w[i] = 1.0
        out = get_method(method).merge(xs, w, base, params)
        torch.testing.assert_close(out, xs[i], rtol=1e-6, atol=1e-6)


def test_soup_is_the_normalised_weighted_mean() -> None:
    xs = models()
    out = get_method("soup").merge(xs, torch.tensor([2.0, 1.0, 1.0]), None, P)
    torch.testing.assert_close(out, 0.5 * xs[0] + 0.25 * xs[1] + 0.25 * xs[2])


def test_slerp_endpoints_norm_and_collinear_fallback() -> None:
    a, b = models(2, (64,))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # Orthogonal vectors of equal norm: every point of the arc keeps the norm (lerp would not).
    u = torch.tensor([3.0, 0.0, 0.0])
    v = torch.tensor([0.0, 3.0, 0.0])
    for t in (0.1, 0.3, 0.5, 0.9):
        assert abs(float(slerp(u, v, t).norm()) - 3.0) < 1e-5
    assert float(((u + v) / 2).norm()) < 2.2  # what lerp gives at the midpoint
    # Nearly collinear: falls back to lerp instead of dividing by sin(Ω) ≈ 0.
    c = a * 2.0 + 1e-6
    torch.testing.assert_close(slerp(a, c, 0.25), 0.75 * a + 0.25 * c)
    assert torch.isfinite(slerp(a, a.clone(), 0.5)).all()


def test_slerp_uses_the_two_highest_weights() -> None:
    assert pair_and_t(torch.tensor([0.1, 0.6, 0.3])) == (1, 2, pytest.approx(1 / 3))
    xs = models()
    out = get_method("slerp").merge(xs, torch.tensor([0.0, 0.5, 0.5]), None, P)
    torch.testing.assert_close(out, slerp(xs[1], xs[2], 0.5))


def test_ties_with_equal_models_returns_that_model() -> None:
    base = torch.randn(6, 7)
    x = base + torch.randn(6, 7)
    for w in ([1 / 3] * 3, [0.7, 0.2, 0.1]):
        out = get_method("ties").merge([x, x.clone(), x.clone()], torch.tensor(w), base, MergeParams(density=1.0))
        torch.testing.assert_close(out, x)
    # With trimming, the kept (largest) half of the task vector survives exactly, the rest is θ_base.
    out = get_method("ties").merge([x, x.clone()], torch.tensor([0.5, 0.5]), base, MergeParams(density=0.5))
    delta = (x - base).abs().flatten()
    kept = delta >= delta.kthvalue(delta.numel() - int(0.5 * delta.numel()) + 1).values
    torch.testing.assert_close(out.flatten()[kept], x.flatten()[kept])
    torch.testing.assert_close(out.flatten()[~kept], base.flatten()[~kept])


def test_ties_drops_the_sign_conflicting_minority() -> None:
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-1.5, -5.0, 3.0])]
    out = get_method("ties").merge(xs, torch.ones(3) / 3, base, MergeParams(density=1.0))
    # entry 0: +1 +1 −1.5 → elected +, mean of the agreeing +1s; entry 1: −5 outweighs 2+2 → −5 alone;
    # entry 2: −1 −1 +3 → elected +, only the +3 survives.
    torch.testing.assert_close(out, torch.tensor([1.0, -5.0, 3.0]))
    # a plain weighted mean would mix the signs
    assert not torch.allclose(out, torch.stack(xs).mean(0))


def test_sign_consensus_mean_is_weighted_by_agreeing_weights() -> None:
    d = [torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([-1.0])]
    out = sign_consensus_mean(d, torch.tensor([0.25, 0.25, 0.5]))
    torch.testing.assert_close(out, torch.tensor([3.0]))  # (0.25·2 + 0.25·4) / 0.5


def test_dare_p0_is_identity_and_p_preserves_the_expected_value() -> None:
    base = torch.randn(50, 40)
    xs = [base + torch.randn(50, 40) for _ in range(2)]
    for method in ("dare_linear", "dare_ties"):
        out = get_method(method).merge([xs[0]], torch.ones(1), base, MergeParams(drop_rate=0.0))
        torch.testing.assert_close(out, xs[0])
    delta = torch.full((200_000,), 0.5)
    dropped = drop_and_rescale(delta, 0.7, seed=3)
    assert abs(float((dropped == 0).float().mean()) - 0.7) < 0.01
    assert abs(float(dropped.mean()) - 0.5) < 0.01  # E[kept / (1 − p)] = delta
    torch.testing.assert_close(drop_and_rescale(delta, 0.7, seed=3), dropped)  # same seed, same mask
    before = torch.random.get_rng_state()
    drop_and_rescale(delta, 0.5, seed=9)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).state_dict()


@pytest.mark.parametrize("method", ["soup", "ties", "dare_ties", "slerp"])
def test_merging_only_attention_leaves_every_other_tensor_of_the_host(method: str) -> None:
    states = [tiny_state(s) for s in (1, 2, 3)]
    base = tiny_state(0)
    out = merge_state_dicts(
        states, [0.2, 0.3, 0.5], method=method, subset=BUILTIN_SUBSETS["attention"], base=base, host=0
    )
    attention = [n for n in out if ".attention." in n]
    assert attention and len(attention) < len(out)
    for name, t in out.items():
        if ".attention." in name:
            if t.ndim == 2:  # random matrices differ; biases and LayerNorms start equal (0 / 1)
                assert not torch.equal(t, states[0][name]), name
        else:
            assert torch.equal(t, states[0][name]), name


def test_subsets_select_by_name_and_no_head_keeps_the_host_head() -> None:
    names = list(tiny_state(0))
    assert BUILTIN_SUBSETS["attention_output"].select(names) == [n for n in names if ".attention.output.dense." in n]
    assert "classifier.weight" not in BUILTIN_SUBSETS["no_head"].select(names)
    states = [tiny_state(s) for s in (1, 2)]
    out = merge_state_dicts(states, [0.5, 0.5], method="soup", subset=BUILTIN_SUBSETS["no_head"], host=1)
    assert torch.equal(out["classifier.weight"], states[1]["classifier.weight"])
    torch.testing.assert_close(
        out["bert.pooler.dense.weight"],
        (states[0]["bert.pooler.dense.weight"] + states[1]["bert.pooler.dense.weight"]) / 2,
    )


def test_subsets_file_adds_a_subset(tmp_path: Path) -> None:
    f = tmp_path / "subsets.yaml"
    f.write_text("ffn:\n  include: ['\\.intermediate\\.dense\\.', '\\.output\\.dense\\.']\n  exclude: ['attention']\n")
    ffn = load_subsets(f)["ffn"]
    assert ffn.selects("bert.encoder.layer.0.intermediate.dense.weight")
    assert not ffn.selects("bert.encoder.layer.0.attention.output.dense.weight")
    f.write_text("bad:\n  include: ['(']\n")
    with pytest.raises(ValueError, match="bad"):
        load_subsets(f)


def test_task_vector_methods_average_tensors_the_base_lacks() -> None:
    states = [tiny_state(s) for s in (1, 2)]
    base = {k: v for k, v in tiny_state(0).items() if not k.startswith("classifier.")}  # a pretrained encoder
    merger = Merger(states, "ties", MergeParams(density=1.0), base=base)
    assert merger.soup_fallback == ["classifier.weight", "classifier.bias"]
    out = merger.merge([0.5, 0.5], BUILTIN_SUBSETS["all"])
    torch.testing.assert_close(
        out["classifier.weight"], (states[0]["classifier.weight"] + states[1]["classifier.weight"]) / 2
    )


def test_cached_merger_matches_the_one_shot_merge() -> None:
    states = [tiny_state(s) for s in (1, 2, 3)]
    base = tiny_state(0)
    merger = Merger(states, "dare_ties", MergeParams(drop_rate=0.3, seed=5), base=base)
    for w in ([0.2, 0.3, 0.5], [0.6, 0.0, 0.4]):
        cached = merger.merge(w, BUILTIN_SUBSETS["all"])
        fresh = merge_state_dicts(
            states,
            w,
            method="dare_ties",
            subset=BUILTIN_SUBSETS["all"],
            base=base,
            params=MergeParams(drop_rate=0.3, seed=5),
        )
        for k in cached:
            assert torch.equal(cached[k], fresh[k]), k


def test_recipe_validation() -> None:
    r = MergeRecipe(method="ties", weights=(1.0, 3.0))
    assert r.weights == (0.25, 0.75)
    for bad in (
        {"method": "nope", "weights": (1.0,)},
        {"method": "soup", "weights": (-1.0, 2.0)},
        {"method": "soup", "weights": (0.0, 0.0)},
        {"method": "soup", "weights": (1.0,), "host": 1},
    ):
        with pytest.raises(ValueError):
            MergeRecipe(**bad)
    with pytest.raises(ValueError):
        MergeParams(density=0.0)


def test_index_and_lineage(tmp_path: Path) -> None:
    def folder(name: str, init: Path | None, **meta) -> Path:
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
        (d / "uniguard.json").write_text(json.dumps({"init": str(init) if init else None, **meta}))
        return d

    pre = folder("pretrained", None)
    gip = folder("mtg/gip", pre, family="mtg-gip", policy=None)
    cft = folder(
        "mtg/tox/cft",
        gip,
        family="mtg-cft",
        policy="toxicity",
        input_template={"instruction": "Instruct: {description}"},
    )
    folder("mtg/tox/fft", gip, family="mtg-fft", policy="toxicity")
    folder(
        "taskguard/tox/fft",
        pre,
        family="taskguard-fft",
        policy="toxicity",
        input_template={"instruction": "", "query": "{prompt}"},
    )
    index = tmp_path / "run" / "checkpoints.json"
    index.write_text(
        json.dumps(
            {
                "run": "run",
                "checkpoints": [
                    {"path": "mtg/tox/cft", "family": "mtg-cft", "policy": "toxicity", "validation_f1": 0.9},
                    {"path": "mtg/tox/fft", "family": "mtg-fft", "policy": "toxicity", "validation_f1": 0.8},
                    {"path": "mtg/gip", "family": "mtg-gip", "policy": None, "validation_f1": 0.7},
                    {
                        "path": "taskguard/tox/fft",
                        "family": "taskguard-fft",
                        "policy": "toxicity",
                        "validation_f1": 0.85,
                        "threshold": 0.5,
                    },
                ],
            }
        )
    )
    sources = resolve_sources([index, cft])  # the folder repeats an index entry: kept once
    assert [s.name for s in sources] == ["mtg-cft/toxicity", "mtg-fft/toxicity", "mtg-gip", "taskguard-fft/toxicity"]
    assert sources[0].reported_f1 == 0.9 and sources[0].input_template.instruction == "Instruct: {description}"
    assert sources[3].input_template.instruction == "" and sources[3].extra == {"threshold": 0.5}
    assert sources[2].covers({"tax_advice"}) and not sources[0].covers({"tax_advice"})
    assert common_base(sources[:3]) == gip.resolve()
    assert common_base(sources[:2]) == gip.resolve()
    assert common_base(sources) == pre.resolve()
