"""The rerankers' heads, losses, prior and checkpoints, on tiny random encoders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.model import CheckpointError, LossConfig, PairEncoder, load_checkpoint, save_checkpoint
from esci_reranker.model.modeling import rank_loss
from tests.conftest import build_tiny_model

QUERIES = ["red running shoes", "usb c cable 2m", "coffee"]
TEXTS = [
    "Nike Air Zoom | Nike | Red",
    "Anker USB-C to USB-C cable, 6 ft | Anker",
    "Ground coffee, 1 lb bag | Peet's",
]


def encode(model, tokenizer, queries=QUERIES, texts=TEXTS):
    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode(queries, texts)
    return encoder.collate(encoded, list(range(len(queries))))


def test_multi_task_forward_returns_named_outputs_of_each_head():
    model, tokenizer = build_tiny_model()
    out = model(**encode(model, tokenizer))
    assert out.score.shape == (3,)
    assert out.esci_logits.shape == (3, 4)
    assert out.substitute_logit.shape == (3,)
    probs = out.esci_logits.softmax(-1)
    expected_gain = probs @ torch.tensor([ESCI_GAINS[c] for c in ESCI_LABELS])
    torch.testing.assert_close(out.expected_gain, expected_gain)
    assert out.loss is None
    assert out.losses == {}


def test_single_task_has_only_the_score_head():
    model, tokenizer = build_tiny_model("esci-cross-encoder")
    out = model(**encode(model, tokenizer), labels=torch.tensor([0, 1, 3]))
    assert out.score.shape == (3,)
    assert out.esci_logits is None
    assert out.substitute_logit is None
    assert out.expected_gain is None
    assert set(out.losses) == {"score"}
    torch.testing.assert_close(out.loss, out.losses["score"])


def test_loss_is_the_weighted_sum_of_task_losses():
    model, tokenizer = build_tiny_model()
    model.loss_config = LossConfig(score_weight=2.0, esci_weight=0.5, substitute_weight=3.0)
    labels = torch.tensor([0, 1, 3])  # E, S, I
    out = model(**encode(model, tokenizer), labels=labels)
    gains = torch.tensor([1.0, 0.1, 0.0])
    torch.testing.assert_close(out.losses["score"], torch.nn.functional.mse_loss(out.score, gains))
    torch.testing.assert_close(out.losses["esci"], torch.nn.functional.cross_entropy(out.esci_logits, labels))
    is_sub = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(
        out.losses["substitute"],
        torch.nn.functional.binary_cross_entropy_with_logits(out.substitute_logit, is_sub),
    )
    expected = 2.0 * out.losses["score"] + 0.5 * out.losses["esci"] + 3.0 * out.losses["substitute"]
    torch.testing.assert_close(out.loss, expected)


def test_class_weights_and_label_smoothing_change_the_classification_loss():
    model, tokenizer = build_tiny_model()
    batch = encode(model, tokenizer)
    labels = torch.tensor([0, 2, 3])
    plain = model(**batch, labels=labels).losses["esci"]
    model.loss_config = LossConfig(class_weights=(1.0, 1.0, 5.0, 1.0), label_smoothing=0.1)
    weighted = model(**batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        weighted.esci_logits, labels, weight=torch.tensor([1.0, 1.0, 5.0, 1.0]), label_smoothing=0.1
    )
    torch.testing.assert_close(weighted.losses["esci"], expected)
    assert not torch.isclose(plain, weighted.losses["esci"])


def test_prior_model_starts_as_the_bi_encoder_cosine():
    model, tokenizer = build_tiny_model(prior="cosine")
    batch = encode(model, tokenizer)
    assert {"query_input_ids", "product_input_ids"} <= set(batch)
    out = model(**batch)
    assert out.prior.shape == (3, 1)
    torch.testing.assert_close(out.score, out.prior[:, 0])
    assert torch.all(out.prior.abs() <= 1.0 + 1e-6)
    # The class heads start uniform: all information comes from the prior's learnt weights.
    torch.testing.assert_close(out.esci_logits, torch.zeros(3, 4))


def test_towers_encode_each_distinct_text_once_with_the_same_prior():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    model.eval()
    queries = ["red shoes", "red shoes", "usb cable", "red shoes"]
    texts = ["Nike Air | Nike", "Adidas Run | Adidas", "Nike Air | Nike", "Nike Air | Nike"]
    batch = encode(model, tokenizer, queries, texts)
    assert batch["query_input_ids"].shape[0] == 2  # "red shoes", "usb cable"
    assert batch["product_input_ids"].shape[0] == 2
    assert batch["query_index"].tolist() == [0, 0, 1, 0]
    assert batch["product_index"].tolist() == [0, 1, 0, 0]
    # The same model on one tower row per pair (the layout before deduplication).
    expanded = {k: v for k, v in batch.items() if not k.endswith("_index")}
    for side in ("query", "product"):
        for key in (f"{side}_input_ids", f"{side}_attention_mask"):
            expanded[key] = batch[key][batch[f"{side}_index"]]
    with torch.no_grad():
        deduped, per_pair = model(**batch), model(**expanded)
    torch.testing.assert_close(deduped.prior, per_pair.prior)
    torch.testing.assert_close(deduped.score, per_pair.score)
    # Same text, same cosine: pairs 0 and 3 are identical.
    torch.testing.assert_close(deduped.prior[0], deduped.prior[3])


def test_lexical_prior_is_a_second_feature_of_every_head():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    assert model.config.prior_features == ("cosine", "lexical")
    batch = encode(model, tokenizer)
    # "red running shoes" vs "Nike Air Zoom | Nike | Red": 1 of 3 query words; "2m" is missing.
    torch.testing.assert_close(batch["lexical"], torch.tensor([1 / 3, 0.75, 1.0]))
    out = model(**batch)
    assert out.prior.shape == (3, 2)
    torch.testing.assert_close(out.prior[:, 1], batch["lexical"])
    # Every head reads both features with its own weights.
    assert {name: tuple(h.prior_weight.shape) for name, h in model.heads.items()} == {
        "score": (1, 2),
        "esci": (4, 2),
        "substitute": (1, 2),
    }
    model.set_prior_heads({"score": (torch.tensor([[0.0, 2.0]]), torch.tensor([0.5]))})
    torch.testing.assert_close(model(**batch).score, 0.5 + 2.0 * batch["lexical"])
    without = {k: v for k, v in batch.items() if k != "lexical"}
    with pytest.raises(ValueError, match="lexical prior"):
        model(**without)


def test_a_lexical_only_model_needs_no_towers():
    model, tokenizer = build_tiny_model(lexical=True)
    batch = encode(model, tokenizer)
    assert "query_input_ids" not in batch
    assert model(**batch).prior.shape == (3, 1)


def test_prior_without_its_training_gradient_leaves_the_towers_out_of_backward():
    model, tokenizer = build_tiny_model(prior="cosine")
    batch = encode(model, tokenizer)
    labels = torch.tensor([0, 1, 3])
    model.train_prior = False
    out = model(**batch, labels=labels)
    assert not out.prior.requires_grad
    out.loss.backward()  # the pair path still trains the encoder
    assert model.encoder.encoder.layer[0].attention.self.query.weight.grad is not None


def test_prior_model_without_tower_inputs_is_a_clear_error():
    model, tokenizer = build_tiny_model(prior="cosine")
    batch = encode(model, tokenizer)
    with pytest.raises(ValueError, match="bi-encoder prior"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_save_then_load_gives_identical_predictions(tmp_path):
    model, tokenizer = build_tiny_model(prior="cosine", pooling="cls", head_hidden=8)
    batch = encode(model, tokenizer)
    before = model(**batch)
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    loaded, loaded_tokenizer = load_checkpoint(folder)
    after = loaded(**encode(loaded, loaded_tokenizer))
    torch.testing.assert_close(after.score, before.score)
    torch.testing.assert_close(after.esci_logits, before.esci_logits)
    assert loaded.config == model.config


def test_checkpoints_with_the_older_one_feature_prior_layout_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer = build_tiny_model(prior="cosine", seed=3)
    with torch.no_grad():
        model.esci_head.prior_weight.normal_()
    before = model(**encode(model, tokenizer))
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    old = {k: (v.squeeze(-1) if k.endswith("prior_weight") else v) for k, v in state.items()}
    save_file(old, str(folder / "model.safetensors"))
    loaded, _ = load_checkpoint(folder)
    torch.testing.assert_close(loaded(**encode(loaded, tokenizer)).esci_logits, before.esci_logits)


def test_saving_over_a_checkpoint_leaves_no_temporary_folders(tmp_path):
    model, tokenizer = build_tiny_model()
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_save_interrupted_between_renames_is_recovered_on_load(tmp_path):
    model, tokenizer = build_tiny_model()
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    # What a kill between "move old aside" and "move new in" leaves behind.
    folder.rename(tmp_path / ".ckpt.old")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config


def test_loading_a_plain_transformers_folder_names_the_other_model_type(tiny_backbone):
    with pytest.raises(CheckpointError, match=r"model_type 'bert' is not an esci-reranker checkpoint"):
        load_checkpoint(tiny_backbone)


def test_loading_errors_name_the_folder_and_the_missing_file(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(broken)
    config = json.loads((broken / "config.json").read_text())
    config["surprise"] = 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown model config key\(s\) \['surprise'\]"):
        load_checkpoint(broken)


def test_weights_that_do_not_match_the_config_are_rejected(
    tmp_path, tiny_checkpoint, tiny_single_task_checkpoint
):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_checkpoint, mixed)
    shutil.copy(tiny_single_task_checkpoint / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights do not match config\.json"):
        load_checkpoint(mixed)


def test_pair_encoder_reports_truncation():
    model, tokenizer = build_tiny_model(max_length=16)
    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode(["shoes", "shoes"], ["red", "very " * 40])
    assert encoded.truncated == [False, True]
    assert max(len(ids) for ids in encoded.pair_ids) == 16


def test_heads_answer_in_fp32_under_bf16_autocast():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    with torch.no_grad():
        for head in model.heads.values():
            torch.nn.init.normal_(head.proj.weight, std=0.5)
    batch = encode(model, tokenizer)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    for name in ("score", "esci_logits", "substitute_logit", "expected_gain"):
        assert getattr(out, name).dtype == torch.float32, name
    # not rounded to bf16's 8 significant bits
    assert not torch.equal(out.score, out.score.bfloat16().float())


def test_listnet_rank_loss_is_the_softmax_cross_entropy_within_each_query():
    scores = torch.tensor([0.9, 0.2, 0.4, 0.5, 0.1], requires_grad=True)
    gains = torch.tensor([1.0, 0.0, 0.1, 1.0, 1.0])
    groups = torch.tensor([7, 7, 7, 3, 3])  # query 3 has two exact matches: nothing to rank
    loss = rank_loss(scores, gains, groups, "listnet", temperature=0.5)
    target = (gains[:3] / 0.5).softmax(-1)
    expected = -(target * (scores[:3] / 0.5).log_softmax(-1)).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert scores.grad[3:].abs().sum() == 0  # the uninformative query gets no gradient
    assert scores.grad[:3].abs().sum() > 0


def test_within_mse_rank_loss_ignores_a_per_query_shift():
    gains = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.01])
    groups = torch.tensor([0, 0, 0, 1, 1])
    shifted = gains + torch.tensor([0.3, 0.3, 0.3, -2.0, -2.0])
    assert rank_loss(shifted, gains, groups, "within_mse", 1.0).item() == pytest.approx(0.0, abs=1e-7)
    swapped = torch.tensor([0.1, 1.0, 0.0, 1.0, 0.01])  # first query's E and S swapped
    assert rank_loss(swapped, gains, groups, "within_mse", 1.0).item() == pytest.approx(
        2 * 0.9**2 / 3 / 2
    )  # two pairs off by 0.9 in query 0 (mean over its 3 pairs), query 1 exact; mean of 2 queries


def test_rank_loss_without_rankable_groups_is_zero_and_still_backpropagates():
    scores = torch.tensor([0.3, 0.8], requires_grad=True)
    loss = rank_loss(scores, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), "listnet", 0.1)
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match=r"loss\.rank_loss"):
        rank_loss(scores, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), "pairwise", 0.1)


def test_rank_weight_adds_the_ranking_loss_and_needs_query_groups():
    model, tokenizer = build_tiny_model()
    batch = encode(model, tokenizer)
    labels = torch.tensor([0, 1, 3])
    model.loss_config = LossConfig(rank_weight=2.0, rank_temperature=0.2)
    with pytest.raises(ValueError, match="groups"):
        model(**batch, labels=labels)
    out = model(**batch, labels=labels, groups=torch.tensor([5, 5, 5]))
    gains = torch.tensor([1.0, 0.1, 0.0])
    torch.testing.assert_close(
        out.losses["rank"], rank_loss(out.score, gains, torch.zeros(3), "listnet", 0.2)
    )
    expected = (
        out.losses["score"] + out.losses["esci"] + 0.5 * out.losses["substitute"] + 2.0 * out.losses["rank"]
    )
    torch.testing.assert_close(out.loss, expected)
