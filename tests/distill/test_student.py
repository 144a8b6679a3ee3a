"""Students: their losses, their starting point and their config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from esci_reranker.distill.config import DistillConfig, DistillRules, load_distill_config
from esci_reranker.distill.student import _targets, build_student, distill_loss, gain_standardisation
from esci_reranker.distill.teacher import rule_probs
from esci_reranker.model.cpu import OnednnLinear, onednn_training_ok
from esci_reranker.model.modeling import RerankerOutput
from esci_reranker.train.config import ConfigError


def _frame(scores: list[float], probs: list[list[float]], queries: list[int]) -> pd.DataFrame:
    frame = pd.DataFrame({"query_id": queries, "t_score": scores})
    for i, label in enumerate("ESCI"):
        frame[f"t_prob_{label}"] = [p[i] for p in probs]
    return frame


def test_score_loss_is_mse_plus_listnet_on_the_standardised_teacher_score():
    frame = _frame([1.0, 3.0, 5.0, 7.0], [[0.25] * 4] * 4, [1, 1, 2, 2])
    cfg = DistillConfig(student="score", optim={"batching": "query"})
    targets = _targets(frame, "score", mean=4.0, std=2.0)
    np.testing.assert_allclose(targets.score.numpy(), [-1.5, -0.5, 0.5, 1.5])
    out = RerankerOutput(score=torch.tensor([-1.5, -0.5, 0.0, 0.0]))
    total, parts = distill_loss(out, targets, np.arange(4), cfg)
    # MSE by hand: (0 + 0 + 0.25 + 2.25) / 4
    assert float(parts["mse"]) == pytest.approx(0.625)

    # ListNet by hand (T = 1): query 1 matches exactly -> its entropy; query 2 predicts uniform
    def ce(target: list[float], pred: list[float]) -> float:
        t = np.exp(target) / np.exp(target).sum()
        return float(-(t * (np.asarray(pred) - np.log(np.exp(pred).sum()))).sum())

    expected = (ce([-1.5, -0.5], [-1.5, -0.5]) + ce([0.5, 1.5], [0.0, 0.0])) / 2
    assert float(parts["listnet"]) == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(0.625 + expected, rel=1e-5)
    # only a shift within each query changes nothing for ListNet
    shifted = RerankerOutput(
        score=torch.tensor([-1.5, -0.5, 0.0, 0.0]) + torch.tensor([3.0, 3.0, -2.0, -2.0])
    )
    _, moved = distill_loss(shifted, targets, np.arange(4), cfg)
    assert float(moved["listnet"]) == pytest.approx(float(parts["listnet"]), rel=1e-5)


def test_esci_loss_is_the_kl_divergence_to_the_teacher_probabilities():
    teacher = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]]
    frame = _frame([0.0, 0.0], teacher, [1, 1])
    cfg = DistillConfig(student="esci", optim={"batching": "length"})
    targets = _targets(frame, "esci", 0.0, 1.0)
    same = RerankerOutput(score=torch.zeros(2), esci_logits=torch.log(torch.tensor(teacher)) + 5.0)
    total, _ = distill_loss(same, targets, np.arange(2), cfg)
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    flat = RerankerOutput(score=torch.zeros(2), esci_logits=torch.zeros(2, 4))
    total, parts = distill_loss(flat, targets, np.arange(2), cfg)
    by_hand = np.mean([sum(p * math.log(p / 0.25) for p in row) for row in teacher])
    assert float(parts["kl"]) == pytest.approx(by_hand, rel=1e-5)
    # with temperature T the loss is T^2 KL of the softened distributions
    hot = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"temperature": 2.0})})
    total_t, parts_t = distill_loss(flat, targets, np.arange(2), hot)
    soft = np.sqrt(np.asarray(teacher))
    soft /= soft.sum(axis=1, keepdims=True)
    by_hand_t = np.mean([sum(p * math.log(p / 0.25) for p in row) for row in soft])
    assert float(parts_t["kl"]) == pytest.approx(by_hand_t, rel=1e-5)
    assert float(total_t) == pytest.approx(4 * by_hand_t, rel=1e-5)


def test_label_weight_mixes_the_human_label_into_labelled_pairs_targets_only():
    teacher = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.2, 0.4]]
    frame = _frame([1.0, 3.0, 5.0], teacher, [1, 1, 2])
    frame["esci_label"] = ["S", "I", None]
    frame["source"] = ["labelled", "labelled", "unlabelled"]
    assert gain_standardisation(frame) == pytest.approx((0.05, 0.05))  # gains 0.1 and 0
    probs = _targets(frame, "esci", 0.0, 1.0, label_weight=0.25).log_probs.exp().numpy()
    np.testing.assert_allclose(probs[0], [0.525, 0.325, 0.075, 0.075], rtol=1e-6)  # 0.75 p + 0.25 S
    np.testing.assert_allclose(probs[1], [0.075, 0.45, 0.15, 0.325], rtol=1e-6)  # 0.75 p + 0.25 I
    np.testing.assert_allclose(probs[2], teacher[2], rtol=1e-6)  # unlabelled: the teacher alone
    z = _targets(frame, "score", 3.0, 2.0, label_weight=0.5, gain_stats=(0.05, 0.05)).score.numpy()
    # teacher z = -1, 0, 1; label z = +1 (S), -1 (I); the unlabelled pair keeps its teacher z
    np.testing.assert_allclose(z, [0.0, -0.5, 1.0], atol=1e-6)
    # weight 0 is the teacher alone, whatever the labels
    np.testing.assert_allclose(_targets(frame, "score", 3.0, 2.0).score.numpy(), [-1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="label_weight"):
        load_distill_config(None, ["loss.label_weight=1.5"])


@pytest.mark.parametrize(("kind", "labels"), [("score", 1), ("esci", 4)])
def test_a_student_starts_as_a_stock_classifier_from_the_backbone(
    kind: str, labels: int, tiny_backbone: Path
):
    from transformers import AutoModel

    cfg = DistillConfig(student=kind, model={"backbone": str(tiny_backbone), "max_length": 32})
    model, _ = build_student(cfg, ("title", "brand"), 300)
    config = model.config
    assert (config.pooling, config.prior, config.lexical) == ("cls", "none", False)
    assert config.head_hidden == model.encoder.config.hidden_size
    assert config.text_fields == ("title", "brand")
    assert config.long_field_chars == 300
    head = model.heads["score" if kind == "score" else "esci"]
    assert head.proj.out_features == labels
    # the pretrained pooler is the head's tanh layer, as in BertForSequenceClassification
    pretrained = AutoModel.from_pretrained(tiny_backbone)
    torch.testing.assert_close(head.body[0].weight, pretrained.pooler.dense.weight)
    assert float(head.proj.bias.detach().abs().max()) == 0.0
    assert float(head.proj.weight.detach().std()) == pytest.approx(0.02, rel=0.5)
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    assert set(model.heads) == ({"score"} if kind == "score" else {"esci"})


def test_esci_student_decision_rules_are_fitted_on_labels_and_folded_into_its_bias(
    tiny_backbone: Path, distill_data: Path
):
    from esci_reranker.distill.student import _fold_offsets, fit_student_offsets, student_reranker
    from esci_reranker.labels import ESCI_LABELS
    from esci_reranker.stack.rules import DecisionRules, fit_class_offsets
    from esci_reranker.train.texts import frame_texts

    cfg = DistillConfig(student="esci", model={"backbone": str(tiny_backbone), "max_length": 32})
    torch.manual_seed(0)
    model, tokenizer = build_student(cfg, ("title", "brand"), 300)
    val = pd.read_parquet(distill_data / "val.parquet").assign(source="labelled")
    unlabelled = val.head(5).assign(source="unlabelled", esci_label=None)

    def predict(frame: pd.DataFrame):
        reranker = student_reranker(model.eval(), tokenizer, batch_size=16)
        return reranker.predict_texts(frame["query"].astype(str).tolist(), frame_texts(frame, model.config))

    before = np.asarray(predict(val).esci_probs)
    # fitted on the labelled pairs only, exactly as the teacher's rules are fitted
    truth = np.array([ESCI_LABELS.index(label) for label in val["esci_label"]])
    offsets = fit_student_offsets(
        model, tokenizer, pd.concat([unlabelled, val]), DistillRules(objective="macro_f1"), 16
    )
    assert offsets == fit_class_offsets(before, truth, "macro_f1")[0]
    assert fit_student_offsets(model, tokenizer, unlabelled, DistillRules(), 16) is None  # nothing labelled
    # folded into the bias: the student's own probabilities and argmax are the rules'
    # (offsets chosen by hand, large enough to change classes: an untrained head barely varies)
    chosen = [0.0, 1.5, -0.7, 2.5]
    _fold_offsets(model, chosen)
    after = predict(val)
    np.testing.assert_allclose(after.esci_probs, rule_probs(before, np.asarray(chosen)), atol=1e-5)
    rules_classes = DecisionRules(class_offsets=chosen).classes(before)
    assert [ESCI_LABELS.index(c) for c in after.esci_classes] == rules_classes.tolist()
    assert (rules_classes != before.argmax(1)).any()


def test_esci_student_offsets_can_follow_the_teachers_classes(tiny_backbone: Path, distill_data: Path):
    """``rules.fit_to: teacher``: the offsets are fitted against the teacher's class of every
    validation pair that has one, unlabelled ones included, not against the human labels."""
    from esci_reranker.distill.student import fit_student_offsets, student_reranker
    from esci_reranker.labels import ESCI_LABELS
    from esci_reranker.stack.rules import fit_class_offsets
    from esci_reranker.train.texts import frame_texts

    cfg = DistillConfig(student="esci", model={"backbone": str(tiny_backbone), "max_length": 32})
    torch.manual_seed(0)
    model, tokenizer = build_student(cfg, ("title", "brand"), 300)
    val = pd.read_parquet(distill_data / "val.parquet").assign(source="labelled")
    rng = np.random.default_rng(0)
    # a teacher that disagrees with the labels; one pair it gave no class (a score-only teacher)
    val["t_class"] = rng.choice(list(ESCI_LABELS), size=len(val), p=[0.1, 0.2, 0.2, 0.5])
    val.loc[val.index[0], "t_class"] = ""
    unlabelled = val.head(6).assign(source="unlabelled", esci_label=None, t_class="I")
    frame = pd.concat([val, unlabelled], ignore_index=True)
    rows = frame[frame["t_class"] != ""]
    reranker = student_reranker(model.eval(), tokenizer, batch_size=16)
    probs = np.asarray(
        reranker.predict_texts(rows["query"].astype(str).tolist(), frame_texts(rows, model.config)).esci_probs
    )
    truth = np.array([ESCI_LABELS.index(c) for c in rows["t_class"]])
    to_teacher = DistillRules(objective="macro_f1", fit_to="teacher")
    got = fit_student_offsets(model, tokenizer, frame, to_teacher, 16)
    assert got == fit_class_offsets(probs, truth, "macro_f1")[0]
    assert got != fit_student_offsets(
        model, tokenizer, frame, DistillRules(objective="macro_f1"), 16
    )  # labels: others
    assert fit_student_offsets(model, tokenizer, frame.drop(columns="t_class"), to_teacher, 16) is None
    with pytest.raises(ValidationError, match="fit_to"):
        DistillRules(fit_to="both")


def test_a_student_can_start_from_the_teachers_fine_tuned_encoder(tiny_backbone: Path, tmp_path: Path):
    from esci_reranker.model import MODEL_CLASSES, ModelConfig, save_checkpoint
    from esci_reranker.model.io import load_checkpoint
    from esci_reranker.model.tiny import tiny_bert_config
    from tests.conftest import build_tiny_model

    teacher_model, tokenizer = build_tiny_model(seed=3)  # not the backbone's weights (seed 0)
    teacher = save_checkpoint(teacher_model, tokenizer, tmp_path / "teacher")
    cfg = DistillConfig(
        student="esci", model={"backbone": str(tiny_backbone), "max_length": 32, "init": "teacher"}
    )
    student, _ = build_student(cfg, ("title",), 300, teacher_encoder=teacher)
    plain, _ = build_student(cfg, ("title",), 300)
    loaded, _ = load_checkpoint(teacher)
    for name, value in loaded.encoder.state_dict().items():
        torch.testing.assert_close(student.encoder.state_dict()[name], value)
    assert not torch.equal(
        plain.encoder.embeddings.word_embeddings.weight, student.encoder.embeddings.word_embeddings.weight
    )
    # the stock head's tanh layer is the teacher encoder's pooler, as for a backbone
    torch.testing.assert_close(student.esci_head.body[0].weight, loaded.encoder.pooler.dense.weight)

    # another architecture, or a folder without our encoder weights: refused by name
    other = ModelConfig(model_type="esci-multitask", backbone={**tiny_bert_config(), "intermediate_size": 40})
    wide = save_checkpoint(MODEL_CLASSES["esci-multitask"](other), tokenizer, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"is not the student's backbone .*intermediate"):
        build_student(cfg, ("title",), 300, teacher_encoder=wide)
    from esci_reranker.distill.student import train_student

    with pytest.raises(ValueError, match="no teacher checkpoint"):
        train_student(cfg, pd.DataFrame(), pd.DataFrame(), ("title",), 300, progress=False)


def test_configs_reject_unknown_keys_and_rank_loss_without_query_batches():
    with pytest.raises(ConfigError, match=r"loss\.rank_wieght: unknown key"):
        load_distill_config("configs/distill_score.yaml", ["loss.rank_wieght=1"])
    with pytest.raises(ConfigError, match=r"set optim\.batching: query"):
        load_distill_config("configs/distill_score.yaml", ["optim.batching=length"])
    with pytest.raises(ConfigError, match=r"student: Input should be 'score' or 'esci'"):
        load_distill_config("configs/distill_score.yaml", ["student=both"])


@pytest.mark.parametrize("name", ["configs/distill_score.yaml", "configs/distill_esci.yaml"])
def test_shipped_configs_load(name: str):
    cfg = load_distill_config(name)
    assert cfg.model.max_length == 96
    assert cfg.model.backbone == "packaged:all-MiniLM-L6-v2"
    assert cfg.student in name


def test_weight_average_follows_the_warmed_up_decay_and_swaps_back():
    from esci_reranker.distill.student import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
    model[1].weight.requires_grad_(False)  # frozen: not averaged, never touched
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    average.update()  # decay min(0.9, 2/11): the start barely counts
    expected = 1.0 - 2 / 11
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    average.update()  # decay min(0.9, 3/12)
    expected = 0.25 * expected + 0.75 * 3.0
    with average.swapped_in():
        torch.testing.assert_close(model[0].weight, torch.full((1, 2), expected))
        torch.testing.assert_close(model[1].weight, torch.zeros(1, 1))
    torch.testing.assert_close(model[0].weight, torch.full((1, 2), 3.0))  # the live weights are back
    with pytest.raises(ValueError, match=r"eval.ema_decay=1.5; expected a value in \(0, 1\)"):
        WeightAverage(model, 1.5)


def test_with_ema_the_validated_and_kept_student_is_the_weight_average(
    distill_data: Path, oof_parquet: Path, tiny_student_overrides: list[str], monkeypatch: pytest.MonkeyPatch
):
    import esci_reranker.distill.student as student_module
    from esci_reranker.distill import teacher_oof_table
    from esci_reranker.distill.data import read_labelled_and_test

    frame, _ = read_labelled_and_test(distill_data)
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    data = frame.merge(table, on=["query_id", "product_id"]).assign(source="labelled")
    is_val = data["query_id"].isin(set(data["query_id"].unique()[:2]))
    seen: dict[int, list[torch.Tensor]] = {}
    onednn_seen: list[bool] = []

    def validate(model, *_args, **_kwargs):
        weights = seen.setdefault(id(seen), [])
        weights.append(model.score_head.proj.weight.detach().clone())
        onednn_seen.append(any(isinstance(m, OnednnLinear) for m in model.modules()))
        return {"val_loss": [9.0, 2.0, 1.0, 3.0, 4.0][len(weights) - 1]}  # best at step 4 of 8

    monkeypatch.setattr(student_module, "_validate", validate)

    def run(decay: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        seen.clear()
        cfg = load_distill_config(
            "configs/distill_score.yaml",
            [*tiny_student_overrides, "model.init=backbone", "optim.max_steps=8", f"eval.ema_decay={decay}"],
        )
        result = student_module.train_student(
            cfg, data[~is_val], data[is_val], ("title",), 300, progress=False
        )
        assert result.best_step == 4
        # trained through oneDNN's linear layers where they exist, kept as the stock model
        assert set(onednn_seen) == {onednn_training_ok()}
        assert not any(isinstance(m, OnednnLinear) for m in result.model.modules())
        std = result.standardisation["std"]  # folded into the kept head after training
        return seen[id(seen)], result.model.score_head.proj.weight.detach() / std

    averaged, kept = run(0.9)
    torch.testing.assert_close(kept, averaged[2])  # the kept student is the validated average
    plain, plain_kept = run(0.0)
    torch.testing.assert_close(plain_kept, plain[2])
    torch.testing.assert_close(averaged[0], plain[0])  # step 0: the same untrained student
    assert not torch.allclose(averaged[2], plain[2])  # same seed, same steps: the average differs
