"""Padding-free training: the packed step gives the padded step's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from esci_reranker.model import PairEncoder
from esci_reranker.model.config import MULTI_TASK, ModelConfig
from esci_reranker.model.cpu import onednn_training_ok, use_onednn_linears
from esci_reranker.model.modeling import LossConfig, MultiTaskReranker
from esci_reranker.model.tiny import tiny_bert_config
from tests.conftest import build_tiny_model

QUERIES = ["red running shoes", "red running shoes", "x", "usb c cable 2m braided", "usb c cable 2m braided"]
TEXTS = [
    "Nike Air Zoom | Nike | Red",
    "Adidas Ultraboost | Adidas | Black",
    "y",
    "Anker USB-C to USB-C cable, 6 ft | Anker | " + "braided nylon " * 10,
    "Nike Air Zoom | Nike | Red",
]
LABELS = torch.tensor([0, 1, 3, 0, 2])
GROUPS = torch.tensor([0, 0, 1, 2, 2])


def _model(dropout: float = 0.0) -> tuple[MultiTaskReranker, object]:
    """Tiny multi-task model with both priors, random heads and the ranking loss on."""
    _, tokenizer = build_tiny_model()
    backbone = tiny_bert_config() | {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(7)
    config = ModelConfig(
        model_type=MULTI_TASK,
        backbone=backbone,
        backbone_name="tiny-random-bert",
        max_length=64,
        prior="cosine",
        lexical=True,
        dropout=dropout,
    )
    model = MultiTaskReranker(config, loss_config=LossConfig(rank_weight=1.0))
    with torch.no_grad():
        for head in model.heads.values():
            torch.nn.init.normal_(head.proj.weight, std=0.5)
            torch.nn.init.normal_(head.prior_weight, std=1.0)
    return model.train(), tokenizer


def _batch(model: MultiTaskReranker, tokenizer: object) -> dict[str, torch.Tensor]:
    encoder = PairEncoder(tokenizer, model.config)  # type: ignore[arg-type]
    batch = encoder.collate(encoder.encode(QUERIES, TEXTS), list(range(len(QUERIES))))
    return batch | {"labels": LABELS, "groups": GROUPS}


def _step(model: MultiTaskReranker, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward and backward of one training step: the loss and every parameter's gradient."""
    out = model(**batch)
    assert out.loss is not None
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("onednn", [False, True], ids=["torch_linears", "onednn_linears"])
def test_packed_step_gives_the_padded_loss_and_gradients_in_fp32(onednn: bool):
    """The padding-free step against the padded one with PyTorch's linear layers (the step
    before), with PyTorch's linears and with oneDNN's, as training runs it in fp32 on a CPU."""
    if onednn and not onednn_training_ok():
        pytest.skip("torch built without oneDNN's training operators")
    padded, tokenizer = _model()
    packed = copy.deepcopy(padded)
    if onednn:
        assert use_onednn_linears(packed) > 0
    assert packed.enable_packed_training()
    batch = _batch(padded, tokenizer)
    assert batch["attention_mask"].min() == 0
    assert batch["product_attention_mask"].min() == 0
    loss_padded, grads_padded = _step(padded, batch)
    loss_packed, grads_packed = _step(packed, batch)
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    assert grads_packed.keys() == grads_padded.keys()
    # every encoder layer and head learns (only the unused pooler and frozen parts have no gradient)
    assert any(n.startswith("encoder.encoder.layer.1.") for n in grads_packed)
    assert {"score_head.proj.weight", "esci_head.prior_weight"} <= grads_packed.keys()
    for name, grad in grads_padded.items():
        # 1e-5 of the tensor's largest gradient (at least 1e-5 absolute), not per element: the
        # key biases' gradient is zero up to rounding (softmax ignores a shift), and a summed
        # gradient such as the token-type embedding's (~60) carries float32 rounding of ~1e-5
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_packed_step_is_close_to_the_padded_one_under_bf16_autocast():
    padded, tokenizer = _model()
    packed = copy.deepcopy(padded)
    packed.enable_packed_training()
    batch = _batch(padded, tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_padded, out_packed = padded(**batch), packed(**batch)
    assert out_padded.loss is not None
    assert out_packed.loss is not None
    assert float(out_packed.loss) == pytest.approx(float(out_padded.loss), rel=2e-2)
    out_packed.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in packed.parameters() if p.grad is not None)


def test_dropout_applies_in_packed_training_and_not_at_inference():
    model, tokenizer = _model(dropout=0.3)
    model.enable_packed_training()
    batch = _batch(model, tokenizer)
    first, second = model(**batch).score, model(**batch).score
    assert not torch.allclose(first, second)  # a new dropout mask each forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).score, model(**batch).score)


def test_switching_off_goes_back_to_the_padded_passes(monkeypatch: pytest.MonkeyPatch):
    model, tokenizer = _model()
    batch = _batch(model, tokenizer)
    calls: list[int] = []
    import esci_reranker.model.modeling as modeling

    real = modeling.packed_states
    monkeypatch.setattr(modeling, "packed_states", lambda enc, b: calls.append(len(b)) or real(enc, b))
    assert model.enable_packed_training()
    model(**batch)
    assert calls == [3]  # the pair and both towers in one packed pass
    assert not model.enable_packed_training(False)
    model(**batch)
    assert calls == [3]


def test_an_encoder_of_another_layout_stays_padded():
    model, _ = _model()
    model.encoder.config.position_embedding_type = "relative_key"
    assert not model.enable_packed_training()
    assert not model.packed_training
