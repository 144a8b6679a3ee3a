"""Settings from environment variables; invalid values stop start-up naming the variable."""

from __future__ import annotations

import pytest

from esci_reranker.serve.settings import (
    DEFAULT_MODEL_PATH,
    SettingsError,
    load_settings,
    looks_like_hub_repo_id,
)


def test_defaults():
    settings = load_settings()
    assert settings.cache_size == 256
    assert settings.max_candidates == 1000
    assert settings.max_text_chars == 10_000
    assert settings.api_key is None
    assert settings.rate_limit == ""
    assert settings.inference_device == "auto"
    assert settings.log_format == "text"
    assert settings.log_level == "INFO"
    assert settings.model_source() == (DEFAULT_MODEL_PATH, "default")


def test_values_come_from_the_environment(monkeypatch):
    for name, value in {
        "MODEL_PATH": "/models/m",
        "INFERENCE_DEVICE": "CPU",
        "API_KEY": "hunter2-key",
        "RATE_LIMIT": "100/minute",
        "CACHE_SIZE": "0",
        "MAX_CANDIDATES": "50",
        "MAX_TEXT_CHARS": "2000",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "JSON",
        "BATCH_SIZE": "16",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.model_path, s.inference_device, s.rate_limit, s.cache_size) == (
        "/models/m",
        "cpu",
        "100/minute",
        0,
    )
    assert (s.max_candidates, s.max_text_chars, s.log_level, s.log_format, s.batch_size) == (
        50,
        2000,
        "DEBUG",
        "json",
        16,
    )
    assert s.api_key is not None
    assert s.api_key.get_secret_value() == "hunter2-key"
    assert "hunter2" not in repr(s)


def test_model_source_precedence(monkeypatch):
    monkeypatch.setenv("HF_MODEL_REPO_ID", "user/esci-model")
    assert load_settings().model_source() == ("user/esci-model", "HF_MODEL_REPO_ID")
    monkeypatch.setenv("MODEL_PATH", "/m")
    assert load_settings().model_source() == ("/m", "MODEL_PATH")
    assert load_settings(model_path="/cli").model_source() == ("/cli", "MODEL_PATH")


def test_empty_strings_mean_unset(monkeypatch):
    monkeypatch.setenv("API_KEY", "")
    monkeypatch.setenv("MODEL_PATH", " ")
    settings = load_settings()
    assert settings.api_key is None
    assert settings.model_path is None


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("CACHE_SIZE", "lots", "valid integer"),
        ("CACHE_SIZE", "-1", "greater than or equal to 0"),
        ("MAX_CANDIDATES", "0", "greater than or equal to 1"),
        ("RATE_LIMIT", "fast", "'100/minute'"),
        ("INFERENCE_DEVICE", "tpu", "auto, cpu, cuda"),
        ("LOG_FORMAT", "xml", "'json' or 'text'"),
        ("LOG_LEVEL", "loud", "'DEBUG'"),
        ("BATCH_SIZE", "0", "greater than or equal to 1"),
        # the memory policy's settings stop start-up the same way
        ("MEMORY_LIMIT_MB", "lots", "MEMORY_LIMIT_MB='lots': Input should be a valid integer"),
        ("MEMORY_LIMIT_MB", "1.5GB", "MEMORY_LIMIT_MB='1.5GB': Input should be a valid integer"),
        (
            "MEMORY_LIMIT_MB",
            "100",
            "MEMORY_LIMIT_MB='100': expected 0 (no memory policy) or at least 256 MiB",
        ),
        ("MEMORY_LIMIT_MB", "-1", "MEMORY_LIMIT_MB='-1': Input should be greater than or equal to 0"),
        ("MALLOC_ARENA_MAX", "0", "MALLOC_ARENA_MAX='0': Input should be greater than or equal to 1"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{name}=" in message
    assert fragment in message
    assert "docs/serving.md" in message


def test_hub_repo_ids_and_paths_are_told_apart(tmp_path):
    assert looks_like_hub_repo_id("user/esci-reranker")
    assert not looks_like_hub_repo_id("runs/default/model")
    assert not looks_like_hub_repo_id("./model")
    assert not looks_like_hub_repo_id("/abs/path")
    (tmp_path / "org").mkdir()
    assert not looks_like_hub_repo_id(str(tmp_path / "org"))


@pytest.mark.parametrize(("precision", "expected"), [("fp32", "fp32"), ("int8", "int8")])
def test_precision_setting_reaches_the_loaded_model(monkeypatch, tiny_checkpoint, precision, expected):
    from esci_reranker.model.cpu import int8_available
    from esci_reranker.serve.state import load_reranker

    if expected == "int8" and not int8_available():
        pytest.skip("torch without dynamic int8 linear layers")
    monkeypatch.setenv("MODEL_PATH", str(tiny_checkpoint))
    monkeypatch.setenv("INFERENCE_DEVICE", "cpu")
    monkeypatch.setenv("PRECISION", precision)
    assert load_reranker(load_settings()).info()["precision"] == expected


def test_unknown_precision_setting_is_named(monkeypatch):
    monkeypatch.setenv("PRECISION", "fp16")
    with pytest.raises(SettingsError, match="PRECISION="):
        load_settings()


def test_max_batch_tokens_defaults_per_device_unless_set(monkeypatch):
    import torch

    settings = load_settings()
    assert settings.max_batch_tokens is None
    assert settings.batch_token_budget(torch.device("cpu")) == 2048  # under the default memory policy
    assert settings.batch_token_budget(torch.device("cuda")) == 16384
    assert load_settings(memory_limit_mb=0).batch_token_budget(torch.device("cpu")) == 4096
    monkeypatch.setenv("MAX_BATCH_TOKENS", "1000")
    assert load_settings().batch_token_budget(torch.device("cpu")) == 1000
