"""GIP loss terms on a tiny random encoder: shapes, masking, VAT, head-only training, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.model.batches import Encoded, collate  # noqa: E402
from training.model.head import HeadConfig, head_forward, train_head  # noqa: E402
from training.model.loop import LoopConfig, gip_step, train_loop  # noqa: E402
from training.model.losses import (  # noqa: E402
    adversarial_perturbation,
    alice_loss,
    classification_loss,
    make_masker,
    mask_tokens,
    mlm_loss,
    symmetric_kl,
)
from training.model.modeling import encoder_parameter_names, new_mlm_head  # noqa: E402


def tiny_model(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tests.tiny import base_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(base_tokenizer_dir()))


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Encoded]:
    texts = [
        ("Instruct: no insults", "Query: you are an idiot and everyone hates you", 1),
        ("Instruct: no insults", "Query: what is the capital of France?", 0),
        ("Instruct: no tax advice", "Query: how much tax do I owe on my side income this year", 1),
        ("Instruct: no tax advice", "Query: tell me a joke", 0),
    ]
    out = []
    for a, b, y in texts:
        enc = tokenizer(a, b)
        out.append(Encoded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], y))
    return out


def test_classification_loss_is_a_scalar_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    loss = classification_loss(logits, labels)
    assert loss.shape == ()
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_masking_labels_are_minus_100_outside_masked_positions(tokenizer, rows) -> None:
    batch = collate(rows)
    masker = make_masker(tokenizer, probability=0.5, seed=1)
    masked, labels = mask_tokens(masker, batch["input_ids"], batch["attention_mask"])
    chosen = labels.ne(-100)
    assert masked.shape == labels.shape == batch["input_ids"].shape
    assert chosen.any()
    assert torch.equal(labels[chosen], batch["input_ids"][chosen])  # targets are the original tokens
    assert torch.equal(masked[~chosen], batch["input_ids"][~chosen])  # unmasked tokens untouched
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids)) | batch["attention_mask"].eq(0)
    assert not (chosen & special).any()  # [CLS], [SEP] and padding are never masked


def test_mlm_loss_reads_masked_positions_only() -> None:
    model = tiny_model()
    head = new_mlm_head(model)
    assert head.predictions.decoder.weight is model.get_input_embeddings().weight  # tied, not copied
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 32)
    targets = torch.randint(1000, 2000, (2, 6))
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, 1] = masked[1, 4] = True
    loss = mlm_loss(head, hidden, targets, masked)
    assert loss.shape == () and loss.item() > 0
    changed = targets.clone()
    changed[0, 2] = 5  # an unmasked token's label
    assert torch.equal(mlm_loss(head, hidden, changed, masked), loss)
    with_ignore = torch.where(masked, targets, torch.full_like(targets, -100))
    assert torch.allclose(mlm_loss(head, hidden, with_ignore), loss)  # default: labels != -100
    moved = hidden.clone()
    moved[1, 0] += 10.0  # an unmasked position's hidden state
    assert torch.allclose(mlm_loss(head, moved, with_ignore), loss)
    changed[0, 1] = 7  # a masked token's label does count
    assert not torch.equal(mlm_loss(head, hidden, changed, masked), loss)


def test_symmetric_kl_is_zero_on_equal_predictions_and_symmetric() -> None:
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert symmetric_kl(a, b).item() > 0
    assert symmetric_kl(a, b).item() == pytest.approx(symmetric_kl(b, a).item())


def _alice(model, batch, eps: float):
    embeds = model.get_input_embeddings()(batch["input_ids"])

    def forward(e):
        return model(
            inputs_embeds=e, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        ).logits

    clean = forward(embeds)
    torch.manual_seed(7)
    delta = adversarial_perturbation(forward, embeds, clean, batch["attention_mask"], eps)
    torch.manual_seed(7)
    kl, adv_ce = alice_loss(forward, embeds, clean, batch["labels"], batch["attention_mask"], eps)
    return delta, kl, adv_ce


def test_vat_term_is_positive_inside_the_eps_ball_and_grows_with_eps(rows) -> None:
    model = tiny_model()  # eval mode: any KL comes from the perturbation, not dropout
    batch = collate(rows)
    delta, kl_small, ce_small = _alice(model, batch, eps=0.01)
    _, kl_big, _ = _alice(model, batch, eps=1.0)
    assert delta.shape == (*batch["input_ids"].shape, 32)
    norms = delta.norm(dim=-1)
    real = batch["attention_mask"].bool()
    assert torch.allclose(norms[real], torch.full_like(norms[real], 0.01), rtol=1e-3)
    assert torch.all(norms[~real] == 0)  # padding is never perturbed
    assert kl_small.shape == ce_small.shape == ()
    assert kl_small.item() > 0 and kl_big.item() > kl_small.item()


def test_gip_step_combines_all_terms_and_reaches_every_part(tokenizer, rows) -> None:
    model = tiny_model().train()
    head = new_mlm_head(model)
    cfg = LoopConfig(lambda_mlm=1.0, lambda_alice=1.0, lambda_cls=1.0, mlm_probability=0.3)
    total, parts = gip_step(model, head, collate(rows), cfg, make_masker(tokenizer, 0.3, seed=0))
    assert {"ce", "kl", "adv_ce", "mlm", "loss"} <= set(parts)
    assert parts["loss"] == pytest.approx(parts["ce"] + parts["kl"] + parts["adv_ce"] + parts["mlm"], rel=1e-4)
    total.backward()
    assert head.predictions.transform.dense.weight.grad is not None
    assert model.classifier.weight.grad is not None and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_cft_leaves_encoder_weights_unchanged(rows) -> None:
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_head(model, rows, HeadConfig(epochs=3, batch_size=2, lr=1e-2, threads=1))
    after = dict(model.named_parameters())
    encoder = set(encoder_parameter_names(model))
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert all(p.requires_grad for p in model.parameters())  # saved checkpoints load fully trainable
    batch = collate(rows)
    batch.pop("labels")
    with torch.inference_mode():  # the cached-feature head is the model's own forward
        cls = model.base_model(**batch).last_hidden_state[:, 0]
        assert torch.allclose(head_forward(model, cls), model(**batch).logits, atol=1e-5)


def test_an_interrupted_loop_resumes_to_the_same_weights(tokenizer, rows, tmp_path: Path) -> None:
    cfg = LoopConfig(batch_size=2, max_steps=4, save_every=2, lambda_mlm=1.0, lambda_alice=1.0, lr=1e-3, threads=1)

    def run(state_dir: Path, crash_at: int | None = None):
        model = tiny_model().train()
        head = new_mlm_head(model)

        def progress(step: int, total: int, info: str) -> None:
            if step == crash_at:
                raise KeyboardInterrupt

        train_loop(
            model,
            rows,
            cfg,
            head=head,
            masker=make_masker(tokenizer, 0.3, seed=0),
            state_dir=state_dir,
            progress=progress,
        )
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=3)
    assert (tmp_path / "b" / "state.pt").exists()
    resumed = run(tmp_path / "b")
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_base_without_token_types_trains_and_scores_through_the_one_loop(tokenizer, rows) -> None:
    """The capacity trial's larger base (MPNet) takes no token_type_ids: the loop's CE, ALICE
    and MLM terms and the scorer drop them for it instead of failing."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from training.eval.scoring import model_scorer
    from training.model.modeling import accepts_token_types, feeds_for

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        num_labels=2,
    )
    model = MPNetForSequenceClassification(config)
    assert not accepts_token_types(model) and accepts_token_types(tiny_model())
    assert "token_type_ids" not in feeds_for(model, input_ids=torch.ones(1, 2), token_type_ids=torch.zeros(1, 2))
    before = model.classifier.out_proj.weight.detach().clone()
    cfg = LoopConfig(batch_size=2, max_steps=2, lambda_mlm=1.0, lambda_alice=1.0, lr=1e-2, threads=1, save_every=0)
    log = train_loop(model, rows, cfg, head=new_mlm_head(model), masker=make_masker(tokenizer, 0.3, seed=0))
    assert {"ce", "kl", "mlm"} <= set(log[-1])
    assert not torch.equal(before, model.classifier.out_proj.weight)
    batch = collate(rows)
    run = model_scorer(model, encoder=None).run  # type: ignore[arg-type]
    probs = run(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), batch["token_type_ids"].numpy())
    assert probs.shape == (len(rows),) and ((probs > 0) & (probs < 1)).all()


def test_bf16_autocast_trains_every_loss_term_and_keeps_fp32_weights(tokenizer, rows) -> None:
    """bf16 autocast: the same loss terms as fp32, weights and optimiser stay fp32, the first
    step's loss agrees with fp32 to bf16's precision."""
    logs, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = tiny_model()
        seen: set[torch.dtype] = set()
        model.classifier.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        dtypes[precision] = seen
        cfg = LoopConfig(batch_size=2, max_steps=1, lambda_mlm=1.0, lambda_alice=1.0, lr=1e-3, threads=1,
                         save_every=0, precision=precision)  # fmt: skip
        logs[precision] = train_loop(
            model, rows, cfg, head=new_mlm_head(model), masker=make_masker(tokenizer, 0.3, seed=0)
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert set(logs["bf16"][-1]) == set(logs["fp32"][-1])
    assert logs["bf16"][-1]["ce"] == pytest.approx(logs["fp32"][-1]["ce"], rel=0.05)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}  # the matmuls ran in bf16


def test_precision_names() -> None:
    from training.model.loop import resolve_precision

    assert resolve_precision("fp32") == "fp32" and resolve_precision("BF16") == "bf16"
    assert resolve_precision("auto", device="cuda:0") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        train_loop(tiny_model(), [], LoopConfig(precision="int8"))
