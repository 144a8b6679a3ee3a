"""oneDNN prepacked linear layers for fp32 CPU inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esci_reranker.model import PairEncoder
from esci_reranker.model.cpu import PackedLinear, int8_available, int8_linear, onednn_available, pack_linears
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _batch(model, tokenizer):
    encoder = PairEncoder(tokenizer, model.config)
    queries = ["red running shoes", "usb c cable", "coffee"]
    texts = ["Nike Air Zoom | Nike | Red", "Anker USB-C cable, 6 ft | Anker", "Ground coffee | Peet's"]
    return encoder.collate(encoder.encode(queries, texts), [0, 1, 2])


def test_packed_model_gives_the_same_outputs_and_state_dict():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, head_hidden=8)
    batch = _batch(model, tokenizer)
    with torch.inference_mode():
        before = model(**batch)
    keys = set(model.state_dict())
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == linears
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert set(model.state_dict()) == keys  # still saves and exports as before
    with torch.inference_mode():
        after = model(**batch)
    for name in ("score", "esci_logits", "substitute_logit"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=1e-5, rtol=1e-5)


def test_packed_linear_falls_back_to_plain_linear_for_training_and_bf16():
    linear = nn.Linear(6, 3)
    packed = PackedLinear(linear)
    x = torch.randn(2, 6, requires_grad=True)
    packed(x).sum().backward()  # gradients flow: the fast path is inference-only
    torch.testing.assert_close(linear.weight.grad, x.detach().sum(0).expand(3, 6))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = packed(torch.randn(2, 6))
    assert bf16.dtype == torch.bfloat16  # autocast applied, as for nn.Linear


def test_packed_linear_packs_again_after_its_weight_changes_in_place():
    """A packed layer that trains (an optimiser step) or loads new weights afterwards computes
    with the new weights, never with the copy packed before."""
    linear = nn.Linear(8, 4)
    packed = PackedLinear(linear)
    x = torch.randn(3, 8)
    optimizer = torch.optim.SGD(packed.parameters(), lr=0.5)
    packed(torch.randn(3, 8, requires_grad=True)).pow(2).sum().backward()
    optimizer.step()  # in place, as training does
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    packed.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), x.sum(-1, keepdim=True).expand(3, 4), atol=1e-5, rtol=1e-5)


def test_nothing_to_pack_returns_zero():
    assert pack_linears(nn.Sequential(nn.ReLU())) == 0
    assert pack_linears(nn.Linear(4, 4).double()) == 0


needs_int8 = pytest.mark.skipif(not int8_available(), reason="torch without dynamic int8 linear layers")


@needs_int8
@pytest.mark.parametrize("packed", [False, True])
def test_int8_linear_is_close_to_the_fp32_layer_and_really_int8(packed):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8_linear(PackedLinear(linear) if packed else linear)
    x = torch.randn(20, 64)
    with torch.inference_mode():
        reference, out = linear(x), layer(x)
    assert out.dtype == torch.float32
    assert out.shape == reference.shape
    error = float((out - reference).abs().max() / reference.abs().max())
    assert 0 < error < 0.03  # int8 rounding: small, and not zero
    assert not any(p.requires_grad for p in layer.parameters())


@needs_int8
def test_quantize_linears_swaps_every_linear_and_keeps_outputs_close():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, head_hidden=8)
    model.eval()
    batch = _batch(model, tokenizer)
    with torch.inference_mode():
        before = model(**batch)
    encoder_linears = sum(type(m) is nn.Linear for m in model.encoder.modules())
    assert model.quantize_int8() == encoder_linears > 0
    assert not any(type(m) is nn.Linear for m in model.encoder.modules())
    assert any(type(m) is nn.Linear for m in model.score_head.modules())  # heads stay fp32
    with torch.inference_mode():
        after = model(**batch)
    for name in ("score", "esci_logits", "substitute_logit"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=0.05, rtol=0.05)
    assert not torch.equal(after.score, before.score)
    with pytest.raises(RuntimeError, match=r"runs in int8 .* cannot be trained"):
        model.train()


def test_bf16_linear_takes_and_gives_fp32_close_to_the_fp32_layer():
    from esci_reranker.model.cpu import Bf16Linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(20, 64)
    with torch.inference_mode():
        reference, out = linear(x), Bf16Linear(linear)(x)
    assert out.dtype == torch.float32
    error = float((out - reference).abs().max() / reference.abs().max())
    assert 0 < error < 0.02  # bf16 rounding of input and weight
