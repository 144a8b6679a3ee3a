"""Standard exports: a checkpoint rewritten as a stock transformers / sentence-transformers model.

- ``hf-classifier``: ``AutoModelForSequenceClassification`` with 4 labels E, S, C, I (the Task 2 head);
  its argmax is our ``esci_class``.
- ``st-cross-encoder``: a 1-label model that ``sentence_transformers.CrossEncoder`` loads with an
  identity activation, so ``CrossEncoder(folder).predict(pairs)`` is our Task 1 regression score.
- ``tei``: the ``st-cross-encoder`` folder plus what Hugging Face text-embeddings-inference reads
  to serve it as a reranker (``check_tei_folder``): the trained pair length in
  ``sentence_bert_config.json``, where TEI looks for its maximum input length.

A stacked checkpoint (trees over the cross-encoder and hand-made features, ``stacker/``), the
default cross-encoder (bi-encoder prior, lexical feature) and the listwise family have no stock
equivalent: distil them into a stock student (``esci-reranker distill``, ``distill/``) and export
that. The llm family's standalone form is ``--format merged`` (``model.llm.merge_checkpoint``).
``check_export_source`` refuses these before any weights are loaded, for every format (ONNX too).

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
from esci_reranker.model.config import STACKER_DIR, STOCK_KEY, ModelConfig
from esci_reranker.model.features import PairEncoder
from esci_reranker.model.io import CheckpointFiles, checkpoint_files, load_checkpoint
from esci_reranker.model.modeling import RerankerModel
from esci_reranker.model.registry import family

HF_CLASSIFIER: Final[str] = "hf-classifier"
ONNX: Final[str] = "onnx"
ST_CROSS_ENCODER: Final[str] = "st-cross-encoder"
TEI: Final[str] = "tei"
#: Where text-embeddings-inference reads the maximum input length of a model (the first of the
#: sentence-transformers config names it tries); without it TEI allows max_position_embeddings.
TEI_LENGTH_FILE: Final[str] = "sentence_bert_config.json"
#: Backbones whose stock classifier TEI's candle backend implements (``bert`` with its pooler,
#: the RoBERTa family with its classification head).
TEI_BACKBONES: Final[frozenset[str]] = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})
#: How to get an exportable model from one that is not: appended to every refusal.
DISTILL_HINT: Final[str] = (
    "To deploy it with stock libraries, distil it into a stock student that exports: "
    "`esci-reranker distill --teacher {model} --config configs/distill_score.yaml --out runs/student-score` "
    "(or configs/distill_esci.yaml for the E/S/C/I classifier), then export runs/student-score/model "
    "(docs/deploy.md)."
)
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
            "--set model.prior=none --set model.lexical=false`. " + DISTILL_HINT.format(model="DIR")
        )
    if backbone_type not in HEAD_LAYOUTS:
        raise ExportError(
            f"export --format {fmt}: backbone model_type {backbone_type!r} is not supported; "
            f"expected one of {sorted(HEAD_LAYOUTS)} (their stock classifiers apply dense + tanh on "
            "the first token, which is what the reranker head computes)."
        )


def build_sequence_classifier(model: RerankerModel, head: str, fmt: str | None = None) -> PreTrainedModel:
    """A stock ``AutoModelForSequenceClassification`` computing one head of ``model`` exactly.

    Args:
        model: a loaded reranker (eval mode).
        head: ``"esci"`` (4 labels E, S, C, I) or ``"score"`` (1 label, the Task 1 regression).
        fmt: the export format, for messages (default: the one ``head`` usually goes to).

    Raises:
        ExportError: the model is not exportable (see the module docstring) or lacks ``head``.
    """
    fmt = fmt or (HF_CLASSIFIER if head == "esci" else ST_CROSS_ENCODER)
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
        if model.score_head is None:
            raise ExportError(
                f"export --format {fmt}: this model ({model.config.model_type}) has no regression "
                "head: it ranks by the expected gain of its E/S/C/I probabilities, which a 1-label "
                f"model cannot compute. Export it with --format {HF_CLASSIFIER} (or onnx), or "
                "distil a score student (configs/distill_score.yaml) for a 1-score reranker."
            )
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


#: What ``--format onnx`` on a stacked checkpoint takes to export its cross-encoder alone.
CROSS_ENCODER_ONLY_FLAG: Final[str] = "--cross-encoder-only"


def check_export_source(source: Path, fmt: str, cross_encoder_only: bool = False) -> CheckpointFiles:
    """Refuse, before any weights are loaded, a checkpoint whose model ``fmt`` cannot express.

    - the ``llm`` family (a causal LM + LoRA reading a prompt): no pairwise classifier or
      pairwise ONNX graph computes it; ``--format merged`` is its standalone form;
    - the ``listwise`` family: a candidate's score depends on its whole candidate list, which a
      pairwise model cannot see; there is no stock equivalent, only a distilled student;
    - a stacked checkpoint (``stacker/``): the trees and hand-made features are not expressible
      in a stock classifier or in ONNX. ``--format onnx`` writes its cross-encoder alone only
      when asked to (``cross_encoder_only``), since that scores differently from the model.

    Args:
        source: the checkpoint folder.
        fmt: the export format, for the messages.
        cross_encoder_only: export the first stage of a stacked checkpoint knowingly (onnx only).

    Returns:
        What the checkpoint holds (its config; ``stacked`` when only its cross-encoder is exported).

    Raises:
        ExportError: the checkpoint is one of the above (the message says what to do instead).
        CheckpointError: ``source`` is missing, not a checkpoint, or lacks its weights.
    """
    files = checkpoint_files(source)
    refusal = family(files.config.model_type).export_refusal
    if refusal is not None:
        raise ExportError(refusal(source, fmt, files.config, files.weights))
    if files.stacked and not (fmt == ONNX and cross_encoder_only):
        what = (
            "the ONNX graph would hold the cross-encoder alone and score differently from the model"
            if fmt == ONNX
            else "trees and features cannot be expressed as a stock sequence classifier"
        )
        first_stage = (
            f" To export the cross-encoder stage alone knowingly, pass {CROSS_ENCODER_ONLY_FLAG} "
            "(the folder then records that it is the first stage only)."
            if fmt == ONNX
            else ""
        )
        raise ExportError(
            f"export --format {fmt}: {source} is a stacked model (a cross-encoder plus gradient-"
            f"boosted trees over its outputs and hand-made features, in {STACKER_DIR}/); {what}. "
            + DISTILL_HINT.format(model=source)
            + first_stage
        )
    return files


def write_classifier(
    folder: Path,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: ModelConfig,
    settings: Mapping[str, object] | None = None,
) -> None:
    """Save a stock classifier and its tokenizer into ``folder`` so other libraries score like us.

    A 1-label model gets sentence-transformers' identity activation; the trained pair length
    travels as the tokenizer's ``model_max_length``. ``settings`` (our ``ModelConfig`` without
    its backbone) go into ``config.json`` under ``STOCK_KEY``, so ``Reranker`` loads the folder too.
    """
    if hf_model.config.num_labels == 1:
        # sentence-transformers applies a sigmoid to 1-label models unless config.json says otherwise.
        hf_model.config.sentence_transformers = {"activation_fn": ST_IDENTITY_ACTIVATION}
    if settings is not None:
        setattr(hf_model.config, STOCK_KEY, dict(settings))
    # transformers pipelines and sentence-transformers both truncate at model_max_length
    tokenizer.model_max_length = config.max_length
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_export_difference(
    model: RerankerModel, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: str, fmt: str
) -> float:
    """The largest |ours - stock| logit on the probe pairs; ``ExportError`` above ``EXPORT_TOLERANCE``."""
    diff = max_export_difference(model, hf_model, tokenizer, head)
    if not diff <= EXPORT_TOLERANCE:
        raise ExportError(
            f"export --format {fmt}: the exported model differs from the checkpoint by {diff:.2e} "
            f"(> {EXPORT_TOLERANCE:g}); not writing it. Please report this with the model's config.json."
        )
    return diff


def _export(model_dir: str | Path, out_dir: str | Path, head: str, overwrite: bool, fmt: str) -> Path:
    source, out = Path(model_dir), Path(out_dir)
    _check_target(source, out, overwrite)
    check_export_source(source, fmt)
    model, tokenizer = load_checkpoint(source, device="cpu")
    hf_model = build_sequence_classifier(model, head, fmt)
    if fmt == TEI and hf_model.config.model_type not in TEI_BACKBONES:
        raise ExportError(
            f"export --format {TEI}: text-embeddings-inference serves sequence classifiers of "
            f"{sorted(TEI_BACKBONES)}, not {hf_model.config.model_type!r}; use --format {ST_CROSS_ENCODER}."
        )
    check_export_difference(model, hf_model, tokenizer, head, fmt)

    with staged_dir(out) as tmp:
        write_classifier(tmp, hf_model, tokenizer, model.config)
        if fmt == TEI:
            (tmp / TEI_LENGTH_FILE).write_text(
                json.dumps({"max_seq_length": model.config.max_length, "do_lower_case": False}, indent=2)
                + "\n"
            )
            check_tei_folder(tmp)
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
    return _export(model_dir, out_dir, "esci", overwrite, HF_CLASSIFIER)


def export_st_cross_encoder(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a 1-label model that ``sentence_transformers.CrossEncoder`` scores like our Task 1 head.

    ``CrossEncoder(out_dir).predict(pairs)`` equals ``Reranker.predict(...).regression_scores``
    (identity activation, same max length). For a model whose ``rank_score`` is
    ``expected_gain`` this is not the score ``rerank`` sorts by.

    Raises:
        ExportError, CheckpointError: as for ``export_hf_classifier``.
    """
    return _export(model_dir, out_dir, "score", overwrite, ST_CROSS_ENCODER)


def export_tei(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a 1-label reranker folder that text-embeddings-inference serves on ``/rerank``.

    The ``st-cross-encoder`` folder (TEI reads ``config.json``, ``tokenizer.json`` and
    ``model.safetensors``) plus ``sentence_bert_config.json`` holding the trained pair length,
    so TEI truncates pairs (``"truncate": true``, longest side first) where we do. TEI's
    ``/rerank`` returns ``sigmoid(score)`` unless the request says ``"raw_scores": true``; both
    rank alike. The folder is checked with ``check_tei_folder`` before it is written.

    Raises:
        ExportError: as ``export_st_cross_encoder``, or a backbone TEI does not serve.
        CheckpointError: ``model_dir`` is not a checkpoint.
    """
    return _export(model_dir, out_dir, "score", overwrite, TEI)


def check_tei_folder(folder: str | Path) -> None:
    """Raise ``ExportError`` unless ``folder`` has what text-embeddings-inference reads for a reranker.

    TEI (router and candle backend) reads ``config.json``: ``architectures`` (a name ending in
    ``Classification`` makes it a classifier), ``model_type``, ``max_position_embeddings``,
    ``pad_token_id``, ``position_embedding_type`` (absolute only) and ``id2label``/``label2id``
    (one label = a reranker, served on ``/rerank``); ``tokenizer.json`` (fast tokenizers only);
    ``model.safetensors`` with the encoder under the base model's prefix and the head's layers
    (for BERT ``bert.pooler.dense``, which TEI silently skips when absent, and ``classifier``);
    and the maximum input length from ``sentence_bert_config.json``.
    """
    folder = Path(folder)
    problems: list[str] = []
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder}: no readable config.json ({err}).") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("Classification") for a in architectures):
        problems.append(f"architectures {architectures} has no *ForSequenceClassification")
    model_type = config.get("model_type")
    if model_type not in TEI_BACKBONES:
        problems.append(f"model_type {model_type!r} is not one of {sorted(TEI_BACKBONES)}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append("position_embedding_type must be 'absolute'")
    if not isinstance(config.get("max_position_embeddings"), int):
        problems.append("max_position_embeddings is missing")
    id2label, label2id = config.get("id2label"), config.get("label2id")
    if not isinstance(id2label, dict) or not isinstance(label2id, dict) or len(id2label) != 1:
        problems.append(f"a reranker needs id2label and label2id with exactly one label (got {id2label})")
    if not (folder / "tokenizer.json").is_file():
        problems.append("tokenizer.json is missing (TEI reads fast tokenizers only)")
    try:
        length = json.loads((folder / TEI_LENGTH_FILE).read_text())["max_seq_length"]
        if not isinstance(length, int) or length > config.get("max_position_embeddings", 0):
            problems.append(f"{TEI_LENGTH_FILE}: max_seq_length {length!r} exceeds max_position_embeddings")
    except (OSError, json.JSONDecodeError, KeyError):
        problems.append(f"{TEI_LENGTH_FILE} with max_seq_length is missing")
    problems += _tei_weight_problems(folder / "model.safetensors", model_type, config.get("hidden_size"))
    if problems:
        raise ExportError(
            f"{folder}: not a folder text-embeddings-inference serves as a reranker: {'; '.join(problems)}."
        )


def _tei_weight_problems(path: Path, model_type: object, hidden: object) -> list[str]:
    """What TEI would miss in the classifier's weights (names and shapes it reads)."""
    from safetensors import safe_open

    if not path.is_file():
        return [f"{path.name} is missing"]
    with safe_open(str(path), "pt") as weights:
        shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
    # transformers saves the RoBERTa family's encoder under "roberta." (XLM-R and CamemBERT too)
    prefix = "bert" if model_type == "bert" else "roberta"
    layout = HEAD_LAYOUTS.get(str(model_type))
    needed: dict[str, tuple[int, ...] | None] = {f"{prefix}.embeddings.word_embeddings.weight": None}
    if layout is not None and isinstance(hidden, int):
        needed |= {
            f"{layout.dense}.weight": (hidden, hidden),
            f"{layout.dense}.bias": (hidden,),
            f"{layout.out}.weight": (1, hidden),
            f"{layout.out}.bias": (1,),
        }
    problems = []
    for key, shape in needed.items():
        if key not in shapes:
            problems.append(f"{path.name} lacks {key}")
        elif shape is not None and shapes[key] != shape:
            problems.append(f"{path.name}: {key} has shape {shapes[key]}, expected {shape}")
    return problems


#: Format name -> exporter ``(model_dir, out_dir, overwrite) -> out_dir``.
EXPORTERS: Final[Mapping[str, Callable[..., Path]]] = {
    HF_CLASSIFIER: export_hf_classifier,
    ST_CROSS_ENCODER: export_st_cross_encoder,
    TEI: export_tei,
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
    elif fmt == TEI:
        usage = (
            "```bash\n"
            "docker run -p 8080:80 -v $PWD/PATH:/model ghcr.io/huggingface/text-embeddings-inference:cpu-latest \\\n"
            "    --model-id /model\n"
            "curl -s localhost:8080/rerank -H 'content-type: application/json' \\\n"
            """    -d '{"query": "running shoes", "texts": ["Nike Air Zoom | Nike | Black"], """
            """"raw_scores": true, "truncate": true}'\n"""
            "```\n\n"
            '`"raw_scores": true` returns the model\'s score (the default applies a sigmoid, which ranks '
            'alike); `"truncate": true` cuts long pairs at the trained length, longest side first.\n'
        )
        what = "a single-score reranker for text-embeddings-inference (the Task 1 regression head)"
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
