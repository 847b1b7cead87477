"""Policy files and the windowing contract of InputEncoder, on the real tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from service.contract.policy import InstructionTooLong, Policy, PolicyFileError, load_policies
from service.model.onnx_model import OnnxModel

GOOD = "id: p1\nname: One\ndescription: Block cats.\n"


def test_shipped_policies_load(shipped_policies: dict[str, Policy]) -> None:
    assert {"prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"} <= set(shipped_policies)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("id: p1\nname: [unclosed\n", "cannot read"),
        ("id: P 1\nname: x\ndescription: y\n", "invalid policy"),
        ("id: p1\nname: x\n", "invalid policy"),
        (GOOD + "colour: red\n", "invalid policy"),
    ],
)
def test_bad_policy_file(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyFileError, match=reason) as info:
        load_policies(tmp_path)
    assert "bad.yaml" in str(info.value)


def test_duplicate_policy_id(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(PolicyFileError, match="duplicate"):
        load_policies(tmp_path)


def test_short_prompt_is_one_window(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    w = tiny_model.encoder.encode(shipped_policies["toxicity"], "hello there")
    assert w.count == 1
    assert len(w.input_ids[0]) == len(w.attention_mask[0]) == len(w.token_type_ids[0]) <= tiny_model.manifest.max_length


def test_long_prompt_windows_overlap_and_cover_everything(
    tiny_model: OnnxModel, shipped_policies: dict[str, Policy]
) -> None:
    enc = tiny_model.encoder
    policy = shipped_policies["prompt_injection"]
    words = [f"w{i}" for i in range(600)]
    w = enc.encode(policy, " ".join(words))
    assert w.count > 1
    assert all(len(ids) <= enc.max_length for ids in w.input_ids)
    tok = enc._tokenizer
    instruction = tok.encode(enc.template.instruction_text(policy), add_special_tokens=False).ids
    queries = []
    for ids, types in zip(w.input_ids, w.token_type_ids, strict=True):
        assert list(ids[1 : 1 + len(instruction)]) == instruction  # every window carries the policy
        queries.append([int(t) for t, ty in zip(ids, types, strict=True) if ty == 1][:-1])  # query side, minus [SEP]
    # Consecutive windows share `stride` tokens, and nothing of the prompt is lost.
    for a, b in itertools.pairwise(queries):
        assert a[-enc.stride :] == b[: enc.stride]
    stitched = queries[0] + [t for q in queries[1:] for t in q[enc.stride :]]
    untruncated = Tokenizer.from_file(str(tiny_model.folder / "tokenizer.json"))
    untruncated.no_truncation()
    full = untruncated.encode(enc.template.query_text(" ".join(words)), add_special_tokens=False).ids
    assert stitched == full
    assert "w599" in tok.decode(stitched)


def test_policy_too_long_for_window(tiny_model: OnnxModel) -> None:
    # Longer than the window minus room for the prompt, but shorter than the window itself.
    long = Policy(id="long", name="long", description=" ".join(["forbidden"] * 110))
    with pytest.raises(InstructionTooLong):
        tiny_model.encoder.encode(long, "hi")


def test_windows_are_int64(tiny_model: OnnxModel, shipped_policies: dict[str, Policy]) -> None:
    w = tiny_model.encoder.encode(shipped_policies["toxicity"], "hi")
    assert all(a.dtype == np.int64 for a in (*w.input_ids, *w.attention_mask, *w.token_type_ids))
