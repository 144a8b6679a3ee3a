"""The model config: everything needed to rebuild a model, saved as ``config.json`` in a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from esci_reranker.data.text import DEFAULT_LONG_FIELD_CHARS, DEFAULT_TEXT_FIELDS, parse_text_fields
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS

#: ``model_type`` values this package writes; anything else in a config.json is another model.
MULTI_TASK: Final[str] = "esci-multitask"
SINGLE_TASK: Final[str] = "esci-cross-encoder"
MODEL_TYPES: Final[tuple[str, ...]] = (MULTI_TASK, SINGLE_TASK)
FORMAT_VERSION: Final[int] = 1
CONFIG_NAME: Final[str] = "config.json"
WEIGHTS_NAME: Final[str] = "model.safetensors"

Pooling = Literal["mean", "cls"]
RankScore = Literal["regression", "expected_gain"]
Prior = Literal["none", "cosine"]


class CheckpointError(ValueError):
    """A folder is not a loadable esci-reranker checkpoint (missing file, other model type, ...)."""


@dataclass
class ModelConfig:
    """How a reranker is built. Stored verbatim in ``config.json`` next to the weights.

    Attributes:
        model_type: ``esci-multitask`` (three heads) or ``esci-cross-encoder`` (Task 1 only).
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
        checks = {
            "pooling": (self.pooling, ("mean", "cls")),
            "rank_score": (self.rank_score, ("regression", "expected_gain")),
            "prior": (self.prior, ("none", "cosine")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"model config: {name}={value!r}; expected one of {list(allowed)}.")
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
        """True when the model has the Task 2 and Task 3 heads."""
        return self.model_type == MULTI_TASK

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["text_fields"] = list(self.text_fields)
        data["esci_labels"] = list(self.esci_labels)
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
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err}).") from None
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
