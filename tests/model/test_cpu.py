"""oneDNN prepacked linear layers for fp32 CPU inference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esci_reranker.model import PairEncoder
from esci_reranker.model.cpu import (
    OnednnLinear,
    PackedLinear,
    int8_available,
    int8_linear,
    linear,
    onednn_available,
    onednn_training_ok,
    pack_linears,
    use_onednn_linears,
    use_torch_linears,
)
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


def _grads(fn, x, weight, bias, grad):
    """``fn``'s output and the gradients of its three inputs (None for an absent bias)."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad)
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    ("shape", "bias"),
    [((6,), True), ((3, 5), False), ((2, 4, 3), True), ((2, 600), True)],
    ids=["2d", "3d_no_bias", "4d", "several_pieces"],
)
def test_onednn_linear_gives_f_linear_output_and_gradients(shape, bias):
    if not onednn_training_ok():
        pytest.skip("torch built without oneDNN's training operators")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, 48, generator=gen)
    weight = torch.randn(80, 48, generator=gen)
    b = torch.randn(80, generator=gen) if bias else None
    grad = torch.randn(*shape, 80, generator=gen)
    fast, fast_grads = _grads(linear, x, weight, b, grad)
    slow, slow_grads = _grads(F.linear, x, weight, b, grad)
    assert type(fast.grad_fn).__name__ == "_OnednnLinearFunctionBackward"  # really the oneDNN path
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)
    for got, want in zip(fast_grads, slow_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_onednn_linear_computes_only_the_gradients_asked_for_and_falls_back_elsewhere():
    if not onednn_training_ok():
        pytest.skip("torch built without oneDNN's training operators")
    x = torch.randn(5, 8)
    weight = torch.randn(4, 8, requires_grad=True)  # a frozen input: only the weight learns
    out = linear(x, weight)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 4).t() @ x, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its own bf16 product
        assert linear(x, weight).dtype == torch.bfloat16
    assert linear(x.double(), weight.double()).grad_fn.__class__.__name__ != "_OnednnLinearFunctionBackward"
    empty = linear(torch.zeros(0, 8), weight)  # an empty batch: F.linear's answer
    assert empty.shape == (0, 4)


def test_use_onednn_linears_keeps_the_parameters_and_trains_the_same():
    if not onednn_training_ok():
        pytest.skip("torch built without oneDNN's training operators")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4, bias=False)).train()
    reference = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    assert use_onednn_linears(model) == 2
    assert all(type(m) is OnednnLinear for m in (model[0], model[2]))
    assert [id(p) for p in model.parameters()] == params_before  # the same objects, not copies
    assert model[0].training
    assert model.state_dict().keys() == state_before.keys()
    x = torch.randn(10, 16)
    for net, opt in ((model, optimizer), (reference, torch.optim.SGD(reference.parameters(), lr=0.1))):
        net(x).pow(2).sum().backward()
        opt.step()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert use_torch_linears(model) == 2
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert [id(p) for p in model.parameters()] == params_before
    assert pack_linears(model.eval()) == 2  # plain layers again: inference packs them as before


def test_training_models_are_built_with_onednn_linears(tiny_backbone):
    from esci_reranker.train.config import TrainConfig
    from esci_reranker.train.loop import build_model

    if not onednn_training_ok():
        pytest.skip("torch built without oneDNN's training operators")
    cfg = TrainConfig.model_validate({"model": {"type": "multi_task", "backbone": str(tiny_backbone)}})
    model, _ = build_model(cfg)
    assert any(isinstance(m, OnednnLinear) for m in model.modules())
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_onednn_rows_go_in_pieces_of_few_shapes():
    """oneDNN keeps a kernel per input shape: whatever a batch's token count, a layer hands it
    pieces of ``ROW_PIECE`` rows or a multiple of ``ROW_ALIGN`` rows, and nothing is lost."""
    from esci_reranker.model.cpu import ROW_ALIGN, ROW_PIECE, _pieces

    shapes = set()
    for n in (1, 63, 64, 65, 511, 512, 513, 1100, 2049):
        rows = torch.randn(n, 3)
        pieces = _pieces(rows)
        shapes |= {p.shape[0] for p in pieces}
        joined = torch.cat(pieces)
        assert torch.equal(joined[:n], rows)
        assert not joined[n:].any()  # the padding is zero rows
        assert all(p.is_contiguous() for p in pieces)
    assert shapes <= {ROW_PIECE} | set(range(ROW_ALIGN, ROW_PIECE + 1, ROW_ALIGN))
