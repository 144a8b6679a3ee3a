"""The faster CPU dropout used in training: the mask's law, the scale, the gradient, the swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esci_reranker.model.cpu import (
    DROPOUT_LEVELS,
    CpuDropout,
    cpu_dropout,
    dropout_keep_mask,
    use_cpu_dropout,
)
from esci_reranker.train.config import TrainConfig
from esci_reranker.train.loop import build_model
from tests.conftest import build_tiny_model


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_the_mask_drops_with_the_rounded_probability(p):
    torch.manual_seed(0)
    n = 3_000_000
    keep, scale = dropout_keep_mask((n,), p)
    q = round(p * DROPOUT_LEVELS) / DROPOUT_LEVELS
    assert scale == pytest.approx(1.0 / (1.0 - q), rel=1e-12)
    dropped = 1.0 - keep.double().mean().item()
    # 5 standard deviations of a binomial share
    assert abs(dropped - q) < 5 * (q * (1 - q) / n) ** 0.5
    # neighbours are independent: each of the three words of a draw, and the draws, drop alike
    pairs = (~keep[:-1] & ~keep[1:]).double().mean().item()
    assert abs(pairs - q * q) < 5 * (q * q * (1 - q * q) / n) ** 0.5
    for offset in range(3):
        share = 1.0 - keep[offset::3].double().mean().item()
        assert abs(share - q) < 5 * (q * (1 - q) / (n / 3)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_and_the_gradient_follows_the_mask(dtype):
    torch.manual_seed(1)
    x = torch.randn(64, 12, 17, 17).to(dtype).requires_grad_(True)
    out = cpu_dropout(x, 0.1)
    assert out.dtype == dtype
    assert out.shape == x.shape
    kept = out != 0
    scale = DROPOUT_LEVELS / (DROPOUT_LEVELS - round(0.1 * DROPOUT_LEVELS))
    torch.testing.assert_close(out[kept], (x[kept].float() * scale).to(dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, (grad.float() * kept * scale).to(dtype))


def test_the_same_seed_draws_the_same_mask_and_eval_mode_is_the_identity():
    x = torch.randn(1000, 33)
    torch.manual_seed(7)
    a = cpu_dropout(x, 0.3)
    torch.manual_seed(7)
    b = cpu_dropout(x, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, cpu_dropout(x, 0.3))
    assert torch.equal(cpu_dropout(x, 0.3, training=False), x)
    assert torch.equal(cpu_dropout(x, 0.0), x)
    assert torch.count_nonzero(cpu_dropout(x, 1.0)) == 0


def test_the_swap_keeps_the_state_dict_and_the_eval_outputs():
    model, _ = build_tiny_model(prior="cosine", lexical=True, head_hidden=8)
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_dropout(model) == len(dropouts) > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    swapped = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert sorted(m.p for m in swapped) == sorted(m.p for m in dropouts)
    state = model.state_dict()
    assert state.keys() == keys.keys()
    assert all(torch.equal(state[k], keys[k]) for k in keys)
    model.eval()
    x = torch.randn(4, 8)
    assert all(torch.equal(m(x), x) for m in swapped)


def test_training_models_are_built_with_it(tiny_backbone):
    cfg = TrainConfig.model_validate({"model": {"type": "multi_task", "backbone": str(tiny_backbone)}})
    model, _ = build_model(cfg)
    assert any(isinstance(m, CpuDropout) for m in model.modules())
    assert not any(type(m) is nn.Dropout for m in model.modules())


def test_other_tensors_keep_pytorchs_dropout():
    torch.manual_seed(3)
    x = torch.randint(0, 10, (100,))  # integer input: F.dropout's own error, unchanged
    with pytest.raises(RuntimeError):
        cpu_dropout(x, 0.5)
    y = torch.randn(2000)
    torch.manual_seed(4)
    ours = CpuDropout(0.5, inplace=True)(y.clone())
    torch.manual_seed(4)
    theirs = F.dropout(y.clone(), 0.5, True, inplace=True)
    assert torch.equal(ours, theirs)
