"""Standard exports: a checkpoint rewritten as a stock transformers / sentence-transformers model.

- ``hf-classifier``: ``AutoModelForSequenceClassification`` with 4 labels E, S, C, I (the Task 2 head);
  its argmax is our ``esci_class``.
- ``st-cross-encoder``: a 1-label model that ``sentence_transformers.CrossEncoder`` loads with an
  identity activation, so ``CrossEncoder(folder).predict(pairs)`` is our Task 1 regression score.

**Exportability rule.** A stock ``BertForSequenceClassification`` applies dense + tanh to the first
token and then one linear layer (``RobertaForSequenceClassification`` does the same inside its
``classifier``). That equals our ``_Head`` (dropout -> Linear(H, head_hidden) -> tanh -> dropout ->
Linear) only when ``pooling == "cls"``, ``head_hidden == hidden_size`` and ``prior == "none"``; our
first Linear becomes the pooler dense layer (BERT: ``bert.pooler.dense``; RoBERTa-style:
``classifier.dense``) and our projection the classifier. Any other model is refused with a message
saying how to train an exportable one. Every export is checked numerically against the source model
before it is written.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from esci_reranker.fsutil import staged_dir
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.model.config import ModelConfig
from esci_reranker.model.features import PairEncoder
from esci_reranker.model.io import load_checkpoint
from esci_reranker.model.modeling import RerankerModel

HF_CLASSIFIER: Final[str] = "hf-classifier"
ST_CROSS_ENCODER: Final[str] = "st-cross-encoder"
#: What sentence-transformers (>= 4) reads from ``config.json`` of a folder without ``modules.json``
#: to pick the activation applied to the logits; without it a 1-label model gets a sigmoid.
ST_IDENTITY_ACTIVATION: Final[str] = "torch.nn.modules.linear.Identity"
#: Largest |difference| allowed between our model and the exported one on the probe pairs.
EXPORT_TOLERANCE: Final[float] = 1e-5

_PROBE_PAIRS: Final[tuple[tuple[str, str], ...]] = (
    ("running shoes", "Nike Air Zoom Pegasus | Nike | Black"),
    ("usb c cable 2m", "Anker USB-C to USB-C Cable, 6.6 ft | Anker | White"),
    ("!", "x"),
)


class ExportError(ValueError):
    """A checkpoint cannot be exported to the requested format (or the target folder is unusable)."""


@dataclass(frozen=True)
class HeadLayout:
    """Where a stock ``*ForSequenceClassification`` keeps the two layers of our head.

    Attributes:
        dense: module path of its dense layer (followed by tanh) on the first token.
        out: module path of its final linear layer.
    """

    dense: str
    out: str


_BERT = HeadLayout(dense="bert.pooler.dense", out="classifier")
_ROBERTA = HeadLayout(dense="classifier.dense", out="classifier.out_proj")
#: Backbone ``model_type`` -> head layout. These classifiers all compute
#: ``out(tanh(dense(hidden[:, 0])))`` at inference; e.g. DistilBERT (ReLU) and ELECTRA (GELU) do not.
HEAD_LAYOUTS: Final[Mapping[str, HeadLayout]] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "mpnet": _ROBERTA,
}


def check_exportable(config: ModelConfig, hidden_size: int, backbone_type: str, fmt: str) -> None:
    """Raise ``ExportError`` unless a stock sequence classifier can reproduce this model exactly.

    Args:
        config: the checkpoint's model config.
        hidden_size: the encoder's hidden size.
        backbone_type: the encoder's transformers ``model_type`` (``bert``, ``roberta``, ...).
        fmt: the export format, for the message.
    """
    problems = []
    if config.pooling != "cls":
        problems.append(f"model.pooling={config.pooling!r} (needs 'cls')")
    if config.head_hidden != hidden_size:
        problems.append(f"model.head_hidden={config.head_hidden} (needs {hidden_size}, the hidden size)")
    if config.prior != "none":
        problems.append(f"model.prior={config.prior!r} (needs 'none')")
    if config.lexical:
        problems.append("model.lexical=true (needs false)")
    if problems:
        raise ExportError(
            f"export --format {fmt}: this checkpoint cannot be expressed as a stock transformers "
            f"sequence classifier: {'; '.join(problems)}. A stock classifier applies dense + tanh to "
            "the first token and then one linear layer, which equals the reranker head only with "
            "the CLS token, a hidden layer as wide as the encoder and no bi-encoder prior. Train an "
            f"exportable model with `--set model.pooling=cls --set model.head_hidden={hidden_size} "
            "--set model.prior=none --set model.lexical=false`."
        )
    if backbone_type not in HEAD_LAYOUTS:
        raise ExportError(
            f"export --format {fmt}: backbone model_type {backbone_type!r} is not supported; "
            f"expected one of {sorted(HEAD_LAYOUTS)} (their stock classifiers apply dense + tanh on "
            "the first token, which is what the reranker head computes)."
        )


def build_sequence_classifier(model: RerankerModel, head: str) -> PreTrainedModel:
    """A stock ``AutoModelForSequenceClassification`` computing one head of ``model`` exactly.

    Args:
        model: a loaded reranker (eval mode).
        head: ``"esci"`` (4 labels E, S, C, I) or ``"score"`` (1 label, the Task 1 regression).

    Raises:
        ExportError: the model is not exportable (see the module docstring) or lacks ``head``.
    """
    fmt = HF_CLASSIFIER if head == "esci" else ST_CROSS_ENCODER
    encoder_config = model.encoder.config
    check_exportable(model.config, encoder_config.hidden_size, encoder_config.model_type, fmt)
    if head == "esci":
        if model.esci_head is None:
            raise ExportError(
                f"export --format {HF_CLASSIFIER}: this is a single-task model ({model.config.model_type}) "
                f"without the E/S/C/I head; export it with --format {ST_CROSS_ENCODER} instead."
            )
        source_head = model.esci_head
        id2label = dict(enumerate(ESCI_LABELS))
        problem_type = "single_label_classification"
    elif head == "score":
        source_head = model.score_head
        id2label = {0: "score"}
        problem_type = "regression"
    else:
        raise ValueError(f"head={head!r}; expected 'esci' or 'score'.")

    config = copy.deepcopy(encoder_config)
    config.num_labels = len(id2label)
    config.id2label = id2label
    config.label2id = {label: i for i, label in id2label.items()}
    config.problem_type = problem_type
    hf_model = AutoModelForSequenceClassification.from_config(config)
    config.architectures = [type(hf_model).__name__]

    # The encoder's own pooler (unused by the reranker) is either overwritten below or absent in
    # the classifier (RoBERTa-style models have none): those keys may differ, nothing else.
    missing, unexpected = hf_model.base_model.load_state_dict(model.encoder.state_dict(), strict=False)
    stray = [k for k in [*missing, *unexpected] if not k.startswith("pooler.")]
    if stray:
        raise ExportError(
            f"export --format {fmt}: encoder weights do not fit {type(hf_model).__name__} "
            f"(mismatched keys {stray[:5]})."
        )
    layout = HEAD_LAYOUTS[encoder_config.model_type]
    first = source_head.body[0]  # type: ignore[index]  # Linear(H, head_hidden), checked above
    hf_model.get_submodule(layout.dense).load_state_dict(first.state_dict())
    hf_model.get_submodule(layout.out).load_state_dict(source_head.proj.state_dict())
    return hf_model.eval()


@torch.inference_mode()
def max_export_difference(
    model: RerankerModel, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: str
) -> float:
    """Largest |ours - exported| logit on a few probe pairs (both models on CPU, float32)."""
    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode([q for q, _ in _PROBE_PAIRS], [t for _, t in _PROBE_PAIRS])
    batch = encoder.collate(encoded, range(len(encoded)))  # CPU tensors, like both models
    out = model(**batch)
    ours = out.score.unsqueeze(-1) if head == "score" else out.esci_logits  # (B, labels)
    if ours is None:
        raise ExportError(f"head={head!r}: the model has no such head.")
    theirs = hf_model(**batch).logits  # (B, labels)
    return float((ours.float() - theirs.float()).abs().max())


def _check_target(source: Path, out: Path, overwrite: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ExportError(f"--out {out} would replace the checkpoint {source}; choose another folder.")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; pass --overwrite to replace it.")


def _export(model_dir: str | Path, out_dir: str | Path, head: str, overwrite: bool) -> Path:
    source, out = Path(model_dir), Path(out_dir)
    _check_target(source, out, overwrite)
    model, tokenizer = load_checkpoint(source, device="cpu")
    hf_model = build_sequence_classifier(model, head)
    fmt = HF_CLASSIFIER if head == "esci" else ST_CROSS_ENCODER
    diff = max_export_difference(model, hf_model, tokenizer, head)
    if not diff <= EXPORT_TOLERANCE:
        raise ExportError(
            f"export --format {fmt}: the exported model differs from the checkpoint by {diff:.2e} "
            f"(> {EXPORT_TOLERANCE:g}); not writing it. Please report this with the model's config.json."
        )
    if head == "score":
        # sentence-transformers applies a sigmoid to 1-label models unless config.json says otherwise.
        hf_model.config.sentence_transformers = {"activation_fn": ST_IDENTITY_ACTIVATION}
    # The trained pair length travels as the tokenizer's model_max_length, which both
    # transformers pipelines and sentence-transformers use to truncate.
    tokenizer.model_max_length = model.config.max_length

    with staged_dir(out) as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_readme(model.config, fmt, source))
        if out.exists() and not out.is_dir():
            out.unlink()
    return out


def export_hf_classifier(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a 4-class (E, S, C, I) ``AutoModelForSequenceClassification`` folder to ``out_dir``.

    Its argmax over logits equals ``Reranker.predict(...).esci_classes``; softmax gives ``esci_probs``.

    Raises:
        ExportError: single-task model, non-exportable head/backbone (see the module docstring),
            or ``out_dir`` exists and is not empty without ``overwrite``.
        CheckpointError: ``model_dir`` is not a checkpoint.
    """
    return _export(model_dir, out_dir, "esci", overwrite)


def export_st_cross_encoder(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a 1-label model that ``sentence_transformers.CrossEncoder`` scores like our Task 1 head.

    ``CrossEncoder(out_dir).predict(pairs)`` equals ``Reranker.predict(...).regression_scores``
    (identity activation, same max length). For a model whose ``rank_score`` is
    ``expected_gain`` this is not the score ``rerank`` sorts by.

    Raises:
        ExportError, CheckpointError: as for ``export_hf_classifier``.
    """
    return _export(model_dir, out_dir, "score", overwrite)


#: Format name -> exporter ``(model_dir, out_dir, overwrite) -> out_dir``.
EXPORTERS: Final[Mapping[str, Callable[..., Path]]] = {
    HF_CLASSIFIER: export_hf_classifier,
    ST_CROSS_ENCODER: export_st_cross_encoder,
}


def _readme(config: ModelConfig, fmt: str, source: Path) -> str:
    fields = ", ".join(config.text_fields)
    if fmt == HF_CLASSIFIER:
        usage = (
            "```python\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'tok = AutoTokenizer.from_pretrained("PATH")\n'
            'model = AutoModelForSequenceClassification.from_pretrained("PATH").eval()\n'
            'batch = tok(["running shoes"], ["Nike Air Zoom | Nike | Black"], truncation=True, return_tensors="pt")\n'
            "probs = model(**batch).logits.softmax(-1)  # columns E, S, C, I\n"
            "```\n"
        )
        what = "a 4-class E/S/C/I classifier (the Task 2 head)"
    else:
        usage = (
            "```python\n"
            "from sentence_transformers import CrossEncoder\n\n"
            'model = CrossEncoder("PATH")  # identity activation: raw regression scores\n'
            'scores = model.predict([("running shoes", "Nike Air Zoom | Nike | Black")])\n'
            "```\n"
        )
        what = "a single-score cross-encoder (the Task 1 regression head)"
    meta = json.dumps({"text_fields": list(config.text_fields), "long_field_chars": config.long_field_chars})
    return (
        f"# ESCI reranker export ({fmt})\n\n"
        f"Exported by `esci-reranker export --format {fmt}` from `{source.name}`: {what}. "
        f"Pairs are (query, product text), truncated to {config.max_length} tokens.\n\n"
        f"Product text must be built as in training: the fields {fields}, cleaned and joined with "
        f'" | " (`esci_reranker.data.text.product_text`, settings `{meta}`).\n\n'
        f"{usage}"
    )
