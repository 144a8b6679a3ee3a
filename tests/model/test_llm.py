"""The LLM label-token family on tiny random Llama / Qwen3 models with a word-level chat tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="the llm extra is not installed")

from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.model import CheckpointError, ModelConfig, load_checkpoint, save_checkpoint
from esci_reranker.model.config import LLMSettings
from esci_reranker.model.features import pair_encoder_for
from esci_reranker.model.llm import LLMReranker, PromptEncoder, build_llm, label_token_ids, merge_checkpoint
from tests.cli.helpers import assert_fails, run
from tests.model.helpers import small_train_config
from tests.model.tiny_llm import save_tiny_base, tiny_tokenizer

QUERIES = ["red running shoes", "red running shoes", "usb c cable"]
TEXTS = ["nike trail running shoes | red", "shoe polish kit", "anker usb c cable | black"]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base") / request.param, request.param)


def _config(base: Path, **settings) -> ModelConfig:
    return ModelConfig(
        model_type="esci-llm", max_length=128, llm=LLMSettings(base_model=str(base), **settings)
    )


def _randomise_adapter(model: LLMReranker, seed: int = 0) -> None:
    """LoRA's B matrices start at zero (the adapter is the identity): give them values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _run(model, tokenizer, queries=QUERIES, texts=TEXTS):
    encoder = pair_encoder_for(tokenizer, model.config)
    encoded = encoder.encode(queries, texts)
    batch = encoder.collate(encoded, range(len(encoded)))
    with torch.no_grad():
        return model(**batch), batch


def test_label_words_must_be_single_tokens() -> None:
    tokenizer = tiny_tokenizer()
    assert label_token_ids(tokenizer, LLMSettings()) == [
        tokenizer.convert_tokens_to_ids(w) for w in ("exact", "substitute", "complement", "irrelevant")
    ]
    with pytest.raises(ValueError, match=r"'not relevant' \(as ' not relevant'.*2 tokens"):
        label_token_ids(
            tokenizer, LLMSettings(label_words=("exact", "substitute", "complement", "not relevant"))
        )


def test_build_checks_label_words_before_loading_anything_else(base: Path) -> None:
    config = _config(base, label_words=("exact", "substitute", "goes with", "irrelevant"))
    with pytest.raises(ValueError, match="'goes with'"):
        build_llm(config)


def test_prompt_is_the_chat_template_and_truncation_keeps_the_answer_position(base: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    encoder = pair_encoder_for(tokenizer, model.config)
    assert isinstance(encoder, PromptEncoder)
    encoded = encoder.encode(["usb c cable"], ["anker usb c cable"])
    tokens = tokenizer.convert_ids_to_tokens(encoded.pair_ids[0])
    assert tokens[0] == "<|im_start|>"
    assert tokens[-4:] == ["<|im_start|>", "assistant", "Label", ":"]  # the answer comes next
    assert {"usb", "c", "cable", "anker", "Query", "Product"} <= set(tokens)  # query and product are in it
    assert encoded.truncated == [False]
    long_text = " ".join(["red shoes"] * 200)
    cut = encoder.encode(["usb c cable"], [long_text])
    assert len(cut.pair_ids[0]) == model.config.max_length
    assert cut.pair_ids[0][-4:] == encoded.pair_ids[0][-4:]
    assert cut.truncated == [True]
    with pytest.raises(ValueError, match=r"model.max_length=40 leaves"):
        PromptEncoder(tokenizer, _config(base).__class__(**{**_config(base).to_dict(), "max_length": 40}))


def test_outputs_are_the_label_token_logits_at_the_last_token(base: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    _randomise_adapter(model)
    model.eval()
    out, batch = _run(model, tokenizer)
    # the same numbers from the full LM forward: row's last real token (right padding), label columns
    with torch.no_grad():
        full = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    expected = full[torch.arange(len(last)), last][:, model.label_ids]
    torch.testing.assert_close(out.esci_logits, expected, atol=1e-5, rtol=1e-5)
    probs = expected.softmax(-1)
    gains = torch.tensor([ESCI_GAINS[c] for c in ESCI_LABELS])
    torch.testing.assert_close(out.expected_gain, probs @ gains)
    torch.testing.assert_close(out.score, out.expected_gain)
    torch.testing.assert_close(out.substitute_logit.sigmoid(), probs[:, 1], atol=1e-6, rtol=1e-5)
    weighted, _ = _run(
        LLMReranker(_config(base, score="weighted"), model.lm, model.label_ids.tolist()), tokenizer
    )
    torch.testing.assert_close(weighted.score, (3 * probs[:, 0] + 2 * probs[:, 1] + probs[:, 2]) / 3)


def test_losses_and_lora_only_training(base: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    model.loss_config.rank_weight = 1.0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in name for name in trainable)
    assert any("q_proj" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    encoder = pair_encoder_for(tokenizer, model.config)
    batch = encoder.collate(encoder.encode(QUERIES, TEXTS), range(3))
    model.train()
    out = model(**batch, labels=torch.tensor([0, 3, 1]), groups=torch.tensor([0, 0, 1]))
    assert {"esci", "score", "rank", "substitute"} == set(out.losses)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A waits for B != 0
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_adapter_save_load_round_trip_gives_identical_scores(base: Path, tmp_path: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    _randomise_adapter(model)
    model.eval()
    before, _ = _run(model, tokenizer)
    folder = save_checkpoint(model, tokenizer, tmp_path / "llm")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "esci-llm"
    assert saved["llm"]["base_model"] == str(base)
    loaded, loaded_tokenizer = load_checkpoint(folder)
    assert isinstance(loaded, LLMReranker)
    assert loaded.has_adapter
    assert loaded.config == model.config
    after, _ = _run(loaded, loaded_tokenizer)
    torch.testing.assert_close(after.esci_logits, before.esci_logits, atol=0, rtol=0)


def test_merged_checkpoint_matches_the_adapter_and_needs_no_base(base: Path, tmp_path: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    _randomise_adapter(model)
    work_base = tmp_path / "base"
    shutil.copytree(base, work_base)
    model.config.llm.base_model = str(work_base)
    folder = save_checkpoint(model.eval(), tokenizer, tmp_path / "llm")
    before, _ = _run(model, tokenizer)
    result = run("export", "--model", folder, "--format", "merged", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged_dir = tmp_path / "merged"
    shutil.rmtree(work_base)  # a merged checkpoint stands alone
    merged, merged_tokenizer = load_checkpoint(merged_dir)
    assert not merged.has_adapter
    assert merged.config.llm.merged
    assert (merged_dir / "merged" / "model.safetensors").is_file()
    after, _ = _run(merged, merged_tokenizer)
    np.testing.assert_allclose(after.score.numpy(), before.score.numpy(), atol=1e-5)
    np.testing.assert_allclose(after.esci_logits.numpy(), before.esci_logits.numpy(), atol=1e-5)
    with pytest.raises(CheckpointError, match=r"base_model=.*: no such folder"):
        load_checkpoint(folder)  # the adapter's base is gone now
    with pytest.raises(CheckpointError, match="already merged"):
        merge_checkpoint(merged_dir, tmp_path / "again")


def test_merge_refuses_other_families(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run("export", "--model", tiny_checkpoint, "--format", "merged", "--out", tmp_path / "m")
    assert_fails(result, "esci-multitask", "--format merged is for the llm family")


def test_stock_exports_are_refused_before_loading_with_the_merged_route(base: Path, tmp_path: Path) -> None:
    model, tokenizer = build_llm(_config(base))
    adapter = save_checkpoint(model, tokenizer, tmp_path / "llm")
    merged = tmp_path / "merged"
    assert run("export", "--model", adapter, "--format", "merged", "--out", merged).exit_code == 0
    # a base that no longer exists: the refusal must come before any weights are loaded
    config = json.loads((adapter / "config.json").read_text())
    config["llm"]["base_model"] = str(tmp_path / "gone")
    (adapter / "config.json").write_text(json.dumps(config))
    for fmt in ("onnx", "hf-classifier", "st-cross-encoder", "tei"):
        result = run("export", "--model", adapter, "--format", fmt, "--out", tmp_path / fmt)
        assert_fails(
            result,
            f"export --format {fmt}: {adapter} is an llm-family checkpoint (model_type 'esci-llm'",
            f"esci-reranker export --model {adapter} --format merged --out DIR",
            f"esci-reranker distill --teacher {adapter}",
        )
        assert not (tmp_path / fmt).exists()
        on_merged = run("export", "--model", merged, "--format", fmt, "--out", tmp_path / fmt)
        assert_fails(on_merged, "the causal LM in merged/", "It is already the standalone form")


def test_adapter_on_another_base_is_refused(base: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    model, tokenizer = build_llm(_config(base))
    folder = save_checkpoint(model, tokenizer, tmp_path / "llm")
    other = save_tiny_base(tmp_path / "other", AutoConfig.from_pretrained(base).model_type)
    config = json.loads((folder / "config.json").read_text())
    config["llm"]["base_model"] = str(other)
    config["backbone"]["num_hidden_layers"] = 3  # as if trained on a deeper LM
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers: trained 3, found 2"):
        load_checkpoint(folder)


def test_llm_trains_end_to_end_and_serves(small_splits: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from esci_reranker.reranker import Reranker
    from esci_reranker.serve import create_app, load_settings
    from esci_reranker.train.loop import train

    base = save_tiny_base(tmp_path / "base", "llama")
    cfg = small_train_config(
        "llm_lora",
        small_splits,
        base,
        "model.max_length=128",
        "data.max_train_rows=48",
        "optim.max_steps=3",
        "optim.batch_size=16",
        "eval.every_steps=3",
        "eval.batch_size=32",
        f"output.save_path={tmp_path / 'model'}",
    )
    result = train(cfg, progress=False)
    assert result.steps == 3
    assert {"task1", "task2", "task3"} <= set(result.test_metrics or {})
    reranker = Reranker.from_pretrained(result.save_path, device="cpu")
    assert reranker.info()["model_type"] == "esci-llm"
    candidates = [(f"p{i}", t) for i, t in enumerate(TEXTS)]
    expected = {c.product_id: c for c in reranker.rerank("red running shoes", candidates)}
    assert all(c.esci_class in ESCI_LABELS for c in expected.values())
    with TestClient(create_app(load_settings(), reranker)) as client:
        body = {
            "query": "red running shoes",
            "candidates": [{"product_id": i, "text": t} for i, t in candidates],
        }
        ranked = client.post("/rerank", json=body).json()["ranked"]
        assert [r["product_id"] for r in ranked] == list(expected)
        for item in ranked:
            assert item["score"] == pytest.approx(expected[item["product_id"]].score, abs=1e-5)
        v1 = client.post("/v1/rerank", json={"query": "red running shoes", "documents": TEXTS, "top_n": 2})
        assert [r["relevance_score"] for r in v1.json()["results"]] == pytest.approx(
            [c.score for c in list(expected.values())[:2]], abs=1e-5
        )
        assert client.post("/substitute", json=body).status_code == 200


def test_base_model_flag_sets_the_backbone(small_splits: Path, tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "configs/llm_lora.yaml"
    missing = tmp_path / "no-such-lm"
    result = run("train", "--config", config, "--base-model", missing, "--set", f"data.dir={small_splits}")
    assert_fails(result, f"model.llm.base_model='{missing}'", "no such folder")


def test_resumable_checkpoint_holds_the_adapter_only_and_resumes_exactly(
    small_splits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from esci_reranker.train import loop as loop_module
    from esci_reranker.train.loop import Trainer, train

    base = save_tiny_base(tmp_path / "base", "llama")

    def config(name: str, *extra: str):
        return small_train_config(
            "llm_lora",
            small_splits,
            base,
            "model.max_length=96",
            "data.max_train_rows=64",
            "optim.max_steps=4",
            "optim.batch_size=8",
            "optim.lr=1e-2",
            "eval.every_steps=100",
            "eval.at_start=false",
            "output.checkpoint_every=2",
            f"output.save_path={tmp_path / name / 'model'}",
            f"output.run_dir={tmp_path / name / 'train'}",
            *extra,
        )

    train(config("full"), progress=False)
    full = load_file(str(tmp_path / "full" / "train" / "last" / "model.safetensors"))
    assert full, "the checkpoint holds the adapter"
    # the LoRA matrices and the model's own buffers (its score vectors), no frozen base weight
    assert {key for key in full if "lora_" not in key} == {"gain_vector", "weighted_vector"}
    assert any("lora_B" in key for key in full)

    # Crash during step 3, after the step-2 checkpoint; resume must end where the full run did.
    real_clip = loop_module.Accelerator.clip_grad_norm_
    calls = {"n": 0}

    class CrashError(Exception):
        pass

    def clip_then_maybe_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise CrashError
        return real_clip(self, *args, **kwargs)

    monkeypatch.setattr(loop_module.Accelerator, "clip_grad_norm_", clip_then_maybe_die)
    with pytest.raises(CrashError):
        Trainer(config("cut"), progress=False).train()
    monkeypatch.setattr(loop_module.Accelerator, "clip_grad_norm_", real_clip)
    assert Trainer(config("cut"), progress=False).train(resume=True).steps == 4
    cut = load_file(str(tmp_path / "cut" / "train" / "last" / "model.safetensors"))
    assert cut.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=1e-5, atol=1e-6, msg=key)

    # A checkpoint whose adapter does not fit this model (another rank, other targets) is refused.
    for other in ("model.llm.lora_r=4", "model.llm.lora_targets=[q_proj]"):
        with pytest.raises(CheckpointError, match="does not match this model's trainable parameters"):
            Trainer(config("cut", other), progress=False).train(resume=True)
