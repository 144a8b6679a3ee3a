"""Tiny random causal LMs (Llama, Qwen3) with a small word-level chat tokenizer, built in the test."""

from __future__ import annotations

from pathlib import Path

import torch

#: A ChatML template, as SmolLM2 and Qwen use.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "exact",
    "substitute",
    "complement",
    "irrelevant",
    "label",
    ":",
    "query",
    "product",
    "classify",
    "the",
    "for",
    "you",
    "judge",
    "products",
    "returned",
    "by",
    "an",
    "online",
    "shop's",
    "search",
    "given",
    "a",
    "shopping",
    "and",
    "answer",
    "with",
    "one",
    "word",
    "matches",
    "every",
    "part",
    "of",
    "it",
    "fails",
    "some",
    "aspect",
    "but",
    "could",
    "stand",
    "in",
    "does",
    "not",
    "match",
    "goes",
    "what",
    "was",
    "asked",
    "or",
    "system",
    "user",
    "assistant",
    "red",
    "running",
    "shoes",
    "nike",
    "usb",
    "c",
    "cable",
    "anker",
    "trail",
    "salomon",
    "black",
    "shoe",
    "laces",
    "generic",
    "phone",
    "case",
    "socks",
    "polish",
    "kit",
    "hdmi",
    "adapter",
    "lightning",
    "apple",
    "dress",
    "clarks",
    "Label",
    "Query",
    "Product",
    "Classify",
]


def tiny_tokenizer():
    """A word-level tokenizer (whitespace and punctuation split) whose vocabulary holds the label words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_lm_config(kind: str, vocab_size: int):
    """A 2-layer causal LM config of ``kind`` ``llama`` or ``qwen3``, hidden 32, GQA 4/2 heads."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        kind,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
    )


def save_tiny_base(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A random tiny causal LM and the tokenizer, saved as a transformers folder (an llm base model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_lm_config(kind, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
