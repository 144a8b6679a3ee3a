"""The weight average of checkpoints ("soup"): exact means, an ordinary checkpoint, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esci_reranker.model import save_checkpoint
from esci_reranker.model.config import WEIGHTS_NAME, CheckpointError
from esci_reranker.model.soup import SOUP_NAME, average_checkpoints
from esci_reranker.reranker import Reranker
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three tiny checkpoints of one architecture with different random weights."""
    root = tmp_path_factory.mktemp("soup")
    folders = []
    for seed in (1, 2, 3):
        model, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=seed)
        folders.append(save_checkpoint(model, tokenizer, root / f"m{seed}", {"metrics.json": "{}"}))
    return folders


def test_soup_is_the_mean_of_every_float_tensor_and_loads_as_a_checkpoint(three, tmp_path):
    dest = average_checkpoints(three, tmp_path / "soup")
    sources = [load_file(f / WEIGHTS_NAME) for f in three]
    soup = load_file(dest / WEIGHTS_NAME)
    assert set(soup) == set(sources[0])
    differing = 0
    for name, tensor in soup.items():
        assert tensor.dtype == sources[0][name].dtype
        if tensor.is_floating_point():
            mean = torch.stack([s[name].double() for s in sources]).mean(0)
            torch.testing.assert_close(tensor.double(), mean, rtol=0, atol=1e-6)
            differing += not torch.equal(sources[0][name], sources[1][name])
        else:
            assert torch.equal(tensor, sources[0][name])
    assert differing > 10  # the sources really differ, so the mean is not any one of them
    assert json.loads((dest / SOUP_NAME).read_text()) == {"mean_of": [str(f) for f in three]}
    assert not (dest / "metrics.json").exists()  # it described one source model
    reranker = Reranker.from_pretrained(dest)
    ranked = reranker.rerank("red running shoes", [("a", "Red running shoe"), ("b", "Shoe polish")])
    assert {r.product_id for r in ranked} == {"a", "b"}


def test_soup_refuses_what_it_cannot_average(three, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints(three[:1], tmp_path / "one")
    with pytest.raises(ValueError, match="is one of the folders"):
        average_checkpoints(three, three[0])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((three[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no_weights: no model\.safetensors"):
        average_checkpoints([three[0], no_weights], tmp_path / "missing")

    other, tokenizer = build_tiny_model(prior="cosine", lexical=False, seed=1)
    odd = save_checkpoint(other, tokenizer, tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"config.json differs .* \['lexical'\]"):
        average_checkpoints([three[0], odd], tmp_path / "mixed")


def _weights_folder(path, config_from, tensors):
    path.mkdir()
    (path / "config.json").write_text((config_from / "config.json").read_text())
    save_file(tensors, str(path / WEIGHTS_NAME))
    return path


def test_soup_keeps_equal_integer_tensors_and_names_any_mismatch(three, tmp_path):
    ids = torch.arange(3)
    a = _weights_folder(tmp_path / "a", three[0], {"w": torch.ones(2), "ids": ids})
    b = _weights_folder(tmp_path / "b", three[0], {"w": torch.zeros(2), "ids": ids.clone()})
    soup = load_file(average_checkpoints([a, b], tmp_path / "ab") / WEIGHTS_NAME)
    torch.testing.assert_close(soup["w"], torch.full((2,), 0.5))
    assert torch.equal(soup["ids"], ids)

    cases = {
        "ints": ({"w": torch.zeros(2), "ids": ids + 1}, "tensor 'ids' .* differs"),
        "shape": ({"w": torch.zeros(3), "ids": ids}, r"tensor 'w' is \(3,\)"),
        "names": ({"w": torch.zeros(2), "ids": ids, "extra": torch.zeros(1)}, r"tensors \['extra'\]"),
    }
    for name, (tensors, message) in cases.items():
        other = _weights_folder(tmp_path / name, three[0], tensors)
        with pytest.raises(CheckpointError, match=message):
            average_checkpoints([a, other], tmp_path / f"soup-{name}")
        assert not (tmp_path / f"soup-{name}").exists()  # nothing half-written is left
