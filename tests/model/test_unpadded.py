"""Padding-free inference: same hidden states and scores as the encoder's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from esci_reranker.model import PairEncoder
from esci_reranker.model.cpu import int8_available
from esci_reranker.model.tiny import tiny_bert_config
from esci_reranker.model.unpadded import Sequences, UnpaddedEncoder, encoder_states, unsupported_reason
from esci_reranker.reranker import Reranker
from tests.conftest import build_tiny_model

QUERIES = ["red running shoes", "x", "usb c cable 2m braided", "red running shoes", "coffee"]
TEXTS = [
    "Nike Air Zoom | Nike | Red",
    "y",
    "Anker USB-C to USB-C cable, 6 ft | Anker | " + "braided nylon " * 10,
    "Adidas Ultraboost | Adidas | Black",
    "Nike Air Zoom | Nike | Red",
]


def _randomised_prior_model():
    """Tiny multi-task model with both priors and random heads (they start at zero otherwise)."""
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=3)
    with torch.no_grad():
        for head in model.heads.values():
            torch.nn.init.normal_(head.proj.weight, std=0.5)
            torch.nn.init.normal_(head.prior_weight, std=1.0)
    return model.eval(), tokenizer


def _batch(model, tokenizer, index=None):
    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode(QUERIES, TEXTS)
    return encoder.collate(encoded, list(range(len(QUERIES))) if index is None else index)


def _groups(batch, sides=("query", "product")):
    """The pair batch and the given tower batches of a collated batch, as ``Sequences``."""
    pair = Sequences(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return [pair] + [Sequences(batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"]) for s in sides]


def test_hidden_states_equal_the_encoders_forward_on_real_tokens_and_zero_at_padding():
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    groups = _groups(batch)
    assert batch["attention_mask"].min() == 0  # the pairs really are padded
    with torch.inference_mode():
        ours = UnpaddedEncoder(model.encoder)(groups)
        for seqs, hidden in zip(groups, ours, strict=True):
            ref = encoder_states(model.encoder, seqs)
            real = seqs.attention_mask.bool()
            assert hidden.shape == ref.shape
            torch.testing.assert_close(hidden[real], ref[real], atol=1e-5, rtol=1e-5)
            assert torch.all(hidden[~real] == 0)


def test_model_outputs_are_unchanged_and_training_never_takes_the_fast_path():
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    with torch.inference_mode():
        padded = model(**batch)
    probes = [Sequences(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])]
    assert model.enable_unpadded(probes)
    calls: list[int] = []
    fast = model.unpadded

    def spy(groups):
        calls.append(len(groups))
        return fast(groups)

    model.unpadded = spy  # type: ignore[assignment]
    with torch.inference_mode():
        unpadded = model(**batch)
    assert calls == [3]  # the pair and both towers in one pass
    for name in ("score", "esci_logits", "substitute_logit", "prior"):
        torch.testing.assert_close(getattr(unpadded, name), getattr(padded, name), atol=1e-5, rtol=1e-5)
    # Training (dropout, gradients) runs the encoder as transformers does.
    model.train()
    model(**batch, labels=torch.tensor([0, 1, 2, 3, 0])).loss.backward()
    assert calls == [3]


def test_encoders_without_the_bert_layout_are_refused():
    assert unsupported_reason(torch.nn.Linear(2, 2)) is not None
    distil = AutoModel.from_config(
        AutoConfig.for_model("distilbert", dim=32, n_layers=1, n_heads=4, hidden_dim=37, vocab_size=100)
    )
    assert "embeddings/encoder.layer" in unsupported_reason(distil)
    with pytest.raises(ValueError, match="cannot run DistilBertModel unpadded"):
        UnpaddedEncoder(distil)
    assert UnpaddedEncoder.attach(distil, []) is None
    bert = AutoModel.from_config(AutoConfig.for_model(**{**tiny_bert_config(), "is_decoder": True}))
    assert unsupported_reason(bert) == "decoder or cross-attention encoder"


def test_a_fast_path_that_disagrees_with_the_encoder_is_not_attached():
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    probes = [Sequences(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])]

    class Wrong(UnpaddedEncoder):
        def __call__(self, batches):
            return [h + 1e-2 for h in super().__call__(batches)]

    assert Wrong.attach(model.encoder, probes) is None
    assert UnpaddedEncoder.attach(model.encoder, probes) is not None


def test_reranker_loads_with_and_without_unpadding_to_the_same_predictions(tiny_prior_checkpoint):
    fast = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", batch_size=3)
    plain = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", batch_size=3, unpad=False)
    assert fast.info()["unpadded"] is True
    assert plain.info()["unpadded"] is False
    a, b = fast.predict_texts(QUERIES, TEXTS), plain.predict_texts(QUERIES, TEXTS)
    torch.testing.assert_close(torch.from_numpy(a.scores), torch.from_numpy(b.scores), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(a.esci_probs), torch.from_numpy(b.esci_probs), atol=1e-5, rtol=1e-5
    )


def test_under_bf16_autocast_it_keeps_autocasts_arithmetic():
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    groups = _groups(batch, sides=("product",))
    fast = UnpaddedEncoder(model.encoder)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fast(groups)
        refs = [encoder_states(model.encoder, g) for g in groups]
    with torch.inference_mode():
        fp32 = fast(groups)
    for g, hidden, ref, full in zip(groups, ours, refs, fp32, strict=True):
        real = g.attention_mask.bool()
        assert hidden.dtype == ref.dtype == torch.float32  # layer norms and residuals stay fp32
        # bf16 rounding: close to autocast's result, and not bit-equal to fp32 (bf16 really ran)
        torch.testing.assert_close(hidden[real], ref[real], atol=5e-2, rtol=5e-2)
        assert (hidden[real] - full[real]).abs().max() > 1e-4


def test_many_sequences_of_mixed_lengths_are_attended_in_chunks_without_mixing():
    from esci_reranker.model.unpadded import ATTENTION_CHUNK, _attention_chunks

    model, tokenizer = _randomised_prior_model()
    encoder = PairEncoder(tokenizer, model.config)
    queries = [f"{q} {i}" for i in range(5) for q in QUERIES]  # 25 distinct pairs
    texts = [t + " extra words" * i for i in range(5) for t in TEXTS]
    batch = encoder.collate(encoder.encode(queries, texts), list(range(len(queries))))
    groups = _groups(batch, sides=("product",))
    rows = sum(len(g.input_ids) for g in groups)
    order, chunks = _attention_chunks([g.attention_mask for g in groups])
    assert len(chunks) == -(-rows // ATTENTION_CHUNK) > 2
    # every real token is in exactly one chunk, chunks tile the reordered tokens, longest first
    assert sorted(order.tolist()) == list(range(int(sum(g.attention_mask.sum() for g in groups))))
    assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]]
    assert chunks[-1].stop == len(order)
    widths = [c.bias.shape[-1] for c in chunks]
    assert widths == sorted(widths, reverse=True)
    # a chunk's real keys are its token count; padding is masked with -inf
    for c in chunks:
        assert int(torch.isfinite(c.bias).sum()) == c.stop - c.start
        assert (c.slots is None) == bool(torch.isfinite(c.bias).all())
    with torch.inference_mode():
        ours = UnpaddedEncoder(model.encoder)(groups)
        for seqs, hidden in zip(groups, ours, strict=True):
            real = seqs.attention_mask.bool()
            torch.testing.assert_close(
                hidden[real], encoder_states(model.encoder, seqs)[real], atol=1e-5, rtol=1e-5
            )


@pytest.mark.skipif(not int8_available(), reason="torch without dynamic int8 linear layers")
@pytest.mark.parametrize("out_in_bf16", [False, True])
def test_int8_layers_stay_close_to_fp32_and_ignore_autocast(out_in_bf16):
    from esci_reranker.model.cpu import Bf16Linear

    model, tokenizer = _randomised_prior_model()
    groups = _groups(_batch(model, tokenizer))
    fast = UnpaddedEncoder(model.encoder)
    with torch.inference_mode():
        fp32 = fast(groups)
        fast.quantize_int8(out_in_bf16)
        assert all(isinstance(layer.out, Bf16Linear) == out_in_bf16 for layer in fast.layers)
        int8 = fast(groups)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            int8_under_autocast = fast(groups)
    for g, full, low, auto in zip(groups, fp32, int8, int8_under_autocast, strict=True):
        real = g.attention_mask.bool()
        assert low.dtype == auto.dtype == torch.float32
        torch.testing.assert_close(low[real], full[real], atol=0.1, rtol=0.1)
        assert (low[real] - full[real]).abs().max() > 1e-4  # int8 really ran
        torch.testing.assert_close(auto, low)  # autocast does not change the int8 path


def test_a_chunk_of_equal_lengths_needs_no_padding():
    from esci_reranker.model.unpadded import _attention_chunks

    model, tokenizer = _randomised_prior_model()
    encoder = PairEncoder(tokenizer, model.config)
    texts = [f"product number {i}" for i in range(6)]  # all the same token count
    batch = encoder.collate(encoder.encode(["shoes"] * 6, texts), list(range(6)))
    groups = _groups(batch, sides=("product",))[1:]  # the product tower alone
    _, chunks = _attention_chunks([g.attention_mask for g in groups])
    assert [c.slots for c in chunks] == [None]
    with torch.inference_mode():
        (hidden,) = UnpaddedEncoder(model.encoder)(groups)
        torch.testing.assert_close(hidden, encoder_states(model.encoder, groups[0]), atol=1e-5, rtol=1e-5)
