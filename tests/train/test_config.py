"""Training config validation: strict keys, typed values, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from esci_reranker.train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["multi_task.yaml", "single_task.yaml", "smoke.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.type in {"multi_task", "single_task"}


def test_default_config_is_multi_task_and_saves_to_the_fixed_place():
    cfg = load_config(CONFIGS / "multi_task.yaml")
    assert cfg.model.type == "multi_task"
    assert cfg.output.save_path == Path("runs/default/model")


def test_unknown_key_is_rejected_with_the_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(path)


def test_mistyped_value_is_rejected_with_the_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"optim\.batch_size: .*integer"):
        load_config(path)


def test_bad_choice_and_bad_text_field_are_rejected():
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        load_config(None, ["model.pooling=max"])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['price'\]"):
        load_config(None, ["model.text_fields=[title,price]"])


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(
        CONFIGS / "multi_task.yaml", ["optim.lr=5e-5", "model.text_fields=title,bullets", "seed=7"]
    )
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.model.text_fields == ("title", "bullets")
    assert cfg.seed == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [("optim.lr", "expected KEY=VALUE"), ("seed.x=1", "'seed' is a value, not a section")],
)
def test_malformed_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "multi_task.yaml", [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="training config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_single_task_cannot_rank_by_expected_gain():
    with pytest.raises(ConfigError, match="rank_score must be 'regression'"):
        load_config(None, ["model.type=single_task", "model.rank_score=expected_gain"])


def test_a_ranking_loss_needs_query_batches_of_at_most_batch_size():
    with pytest.raises(ConfigError, match=r"optim\.batching: query"):
        load_config(None, ["loss.rank_weight=0.5"])
    with pytest.raises(ConfigError, match=r"group_size \(40\) must not exceed optim\.batch_size \(32\)"):
        load_config(None, ["optim.batching=query", "optim.group_size=40"])
    with pytest.raises(ConfigError, match=r"loss\.rank_loss"):
        load_config(None, ["loss.rank_loss=pairwise"])
    cfg = load_config(None, ["loss.rank_weight=0.5", "optim.batching=query", "loss.rank_loss=within_mse"])
    assert (cfg.loss.rank_weight, cfg.loss.rank_loss, cfg.optim.group_size) == (0.5, "within_mse", 16)


def test_the_shipped_student_labels_by_its_teachers_rules():
    # student-esci learns the teacher's probabilities after the teacher's rules, so its argmax is
    # the teacher's rule; offsets of its own (when turned on) are fitted for the teacher's metric
    from esci_reranker.distill.config import load_distill_config

    teacher = load_config(CONFIGS / "multi_task.yaml")
    student = load_distill_config(CONFIGS / "distill_esci.yaml")
    assert student.rules.class_offsets is False
    assert student.rules.objective == teacher.stack.task2_objective == "micro_macro"
    assert student.rules.macro_weight == teacher.stack.task2_macro_weight
    assert student.rules.min_irrelevant_recall == teacher.stack.task2_min_irrelevant_recall
