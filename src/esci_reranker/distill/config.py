"""The distillation config (``configs/distill_score.yaml``, ``configs/distill_esci.yaml``).

YAML mapped onto strict pydantic models that reject unknown keys by name, through the same
loader as training configs (``train.config.load_yaml_config``); ``--set section.key=value``
overrides any value. The optimiser section is the training config's own (``OptimSection``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from esci_reranker.data.text import parse_text_fields
from esci_reranker.stack.rules import Task2Objective
from esci_reranker.train.config import (
    PACKAGED_BACKBONE,
    MixedPrecision,
    OptimSection,
    StrictModel,
    YamlConfig,
)

#: The two student kinds: one logit (Task 1 score) or four (E/S/C/I).
StudentKind = Literal["score", "esci"]


class DistillData(StrictModel):
    """The distillation pairs: labelled train+val pairs plus unlabelled pairs made from them.

    Test-split rows are never read into the set, and neither are train/val rows whose product
    or query also appears in the test split (``distill.data``).
    """

    dir: Path = Field(Path("runs/default/data"), description="Prepared splits (train/val/test.parquet).")
    unlabelled_per_query: int = Field(
        60, ge=0, description="Unlabelled pairs per query: the query with products of other queries."
    )
    similar_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of a query's unlabelled products drawn from the candidates of its most "
        "similar other queries (TF-IDF of the query words); the rest uniformly from all products.",
    )
    similar_queries: int = Field(10, ge=1, description="How many similar queries the share draws from.")
    retrieved_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of a query's unlabelled products taken from the top of what a search of "
        "the train+val catalogue retrieves for it (its judged products skipped): products a search "
        "brings back that may be about something else. 0 = none.",
    )
    retrieved_rule: Literal["top", "foreign"] = Field(
        "top",
        description="Which retrieved products the share takes: 'top' (the top of the list) or "
        "'foreign' (only those judged for queries that share no word with this one, as the "
        "teacher's catalogue negatives are chosen).",
    )
    synthetic_queries: int = Field(
        0,
        ge=0,
        description="Queries made from a few words of pool products' titles, each with the products "
        "a TF-IDF search of the pool's titles ranks first: new queries for the teacher to label, "
        "as a user's are (always training queries, never validation ones). 0 = none.",
    )
    synthetic_per_query: int = Field(
        40, ge=1, description="Products per synthetic query (the top of its title search)."
    )
    val_share: float = Field(
        0.1, gt=0, lt=0.5, description="Share of the distillation queries held out for early stopping."
    )
    seed: int = Field(0, description="Seed of the sampling and of the validation queries.")

    @model_validator(mode="after")
    def _shares_fit(self) -> DistillData:
        if self.retrieved_share + self.similar_share > 1:
            raise ValueError(
                f"data.retrieved_share={self.retrieved_share} + data.similar_share={self.similar_share} "
                "> 1: they are shares of the same unlabelled pairs; lower one so they add up to 1 at most."
            )
        return self


class TeacherSection(StrictModel):
    """How the teacher scores the pairs (its outputs are cached in the output folder)."""

    batch_size: int = Field(64, ge=1)
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"
    device: str = Field("auto", description="cpu, cuda, cuda:N, mps or auto.")
    list_size: int = Field(
        8,
        ge=1,
        description="Unlabelled pairs scored per candidate list, each list beside the query's "
        "labelled candidates (a stacked teacher's list features see lists like its training lists).",
    )


class StudentModel(StrictModel):
    """The student: a stock BertForSequenceClassification-style model on pretrained weights."""

    backbone: str = Field(
        PACKAGED_BACKBONE, description="Encoder weights: packaged:..., a folder or a Hub id."
    )
    init: Literal["backbone", "teacher"] = Field(
        "backbone",
        description="Where the encoder's weights start: the backbone's pretrained ones, or the "
        "teacher's fine-tuned cross-encoder (same architecture as the backbone; in distill-cv each "
        "fold's cross-encoder, which never saw the fold).",
    )
    max_length: int = Field(96, ge=8, le=512)
    text_fields: tuple[str, ...] | None = Field(
        None, description="Product fields the student reads (default: the teacher's)."
    )
    long_field_chars: int | None = Field(None, ge=8, description="Default: the teacher's.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_embeddings: bool = Field(True, description="Keep the word-embedding matrix fixed.")

    @field_validator("text_fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> tuple[str, ...] | None:
        return None if value is None else parse_text_fields(value)


class DistillLoss(StrictModel):
    """``score``: MSE to the teacher's standardised score plus a within-query ListNet term;
    ``esci``: KL divergence to the teacher's class probabilities (after its decision rules).
    ``label_weight`` mixes the human labels of the labelled pairs into both targets."""

    score_weight: float = Field(1.0, ge=0, description="score student: weight of the MSE term.")
    rank_weight: float = Field(
        1.0, ge=0, description="score student: weight of the within-query ListNet term (0 = off)."
    )
    rank_temperature: float = Field(
        1.0, gt=0, description="ListNet softmax temperature, in teacher standard deviations."
    )
    temperature: float = Field(
        1.0, gt=0, description="esci student: softmax temperature of the KL term (T^2-scaled)."
    )
    label_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the human label in a labelled pair's target (unlabelled pairs: the "
        "teacher alone). score: (1-w)·z_teacher + w·z_gain, the gain standardised like the teacher's "
        "score; esci: (1-w)·p_teacher + w·one-hot(label).",
    )


class DistillRules(StrictModel):
    """The esci student's own Task 2 decision rules: per-class offsets on its log-probabilities
    fitted after training on the validation queries' labelled pairs (held out from its training,
    as the teacher's rules are fitted on out-of-fold outputs), then folded into its classifier
    bias so that a stock classifier's argmax is the class our service reports. The shipped
    ``configs/distill_esci.yaml`` turns them off: the student's targets already carry its
    teacher's rules, and offsets fitted on a few validation queries did worse on other queries."""

    class_offsets: bool = Field(True, description="Fit the offsets (false: the plain argmax).")
    objective: Task2Objective = Field(
        "micro_f1",
        description="What the offsets maximise on the labels: micro-F1, macro-F1 or their mean "
        "(the default teacher's, micro_macro).",
    )
    macro_weight: float = Field(
        1.0,
        ge=0,
        description="micro_macro: macro-F1's weight against micro-F1, (micro + w * macro) / (1 + w), as "
        "the teacher's stack.task2_macro_weight.",
    )
    min_irrelevant_recall: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The share of the validation queries' irrelevant pairs the offsets must label I, "
        "as the teacher's stack.task2_min_irrelevant_recall.",
    )
    fit_to: Literal["labels", "teacher"] = Field(
        "labels",
        description="What the offsets are fitted against on the validation queries: 'labels' (their "
        "labelled pairs' human labels) or 'teacher' (the teacher's class of every validation pair, "
        "labelled or not, so the student decides as its teacher, on unrelated products too).",
    )


class DistillEval(StrictModel):
    """Validation on the held-out distillation queries; early stopping on its distillation loss."""

    every_steps: int = Field(100, ge=1)
    at_start: bool = Field(
        True, description="Evaluate the untrained student first (logged; never the kept model)."
    )
    patience: int = Field(4, ge=1, description="Evaluations without improvement before stopping.")
    batch_size: int = Field(64, ge=1)
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Validate (and keep) an exponential moving average of the weights, updated "
        "every step with this decay; 0 = the weights themselves. The average is still one stock "
        "model.",
    )


class DistillConfig(YamlConfig):
    """A whole distillation run (``esci-reranker distill``)."""

    KIND: ClassVar[str] = "distillation"
    EXAMPLE: ClassVar[str] = "configs/distill_score.yaml"

    student: StudentKind = "score"
    seed: int = 0
    mixed_precision: MixedPrecision = "auto"
    data: DistillData = DistillData()
    teacher: TeacherSection = TeacherSection()
    model: StudentModel = StudentModel()
    loss: DistillLoss = DistillLoss()
    # the training config's optimiser section (it checks that query slices fit the batches);
    # query slices by default: the score student's ListNet term compares pairs of one query
    optim: OptimSection = OptimSection(batching="query")
    eval: DistillEval = DistillEval()
    rules: DistillRules = DistillRules()

    @model_validator(mode="after")
    def _rank_needs_groups(self) -> DistillConfig:
        if self.student == "score" and self.loss.rank_weight > 0 and self.optim.batching != "query":
            raise ValueError(
                "loss.rank_weight > 0 compares pairs of the same query: set optim.batching: query "
                "(or loss.rank_weight: 0)."
            )
        return self


#: Read a YAML distillation config, apply ``--set`` overrides and validate (``YamlConfig.load``).
load_distill_config = DistillConfig.load
