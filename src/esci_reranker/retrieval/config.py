"""The retriever-training config (``configs/retriever.yaml``): YAML onto strict pydantic models.

Unknown keys are rejected by name, as in ``train/config.py``; ``--set section.key=value``
overrides any value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from esci_reranker.data.text import DEFAULT_TEXT_FIELDS, parse_text_fields
from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER
from esci_reranker.retrieval.fusion import DEFAULT_RRF_K
from esci_reranker.train.config import StrictModel, YamlConfig

RetrieverLoss = Literal["mnrl", "cosent"]


class RetrieverData(StrictModel):
    """Prepared splits (``esci-reranker prepare --out DIR``): train and val are read, test never."""

    dir: Path = Field(Path("runs/default/data"), description="Folder with train.parquet and val.parquet.")


class RetrieverModel(StrictModel):
    """The bi-encoder to fine-tune and the product text it reads."""

    base: str = Field(PACKAGED_RETRIEVER, description="A sentence-transformers folder or packaged:...")
    text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS
    max_seq_length: int = Field(64, ge=8, le=512)

    @field_validator("text_fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> tuple[str, ...]:
        return parse_text_fields(value)


class RetrieverLossSection(StrictModel):
    """``mnrl``: MultipleNegativesRankingLoss on (query, E product, hard negative) triplets, the hard
    negative an I or C product of the same query; ``cosent``: CoSENTLoss on (query, product, gain)."""

    name: RetrieverLoss = "mnrl"
    hard_negative_labels: tuple[Literal["S", "C", "I"], ...] = ("I", "C")
    scale: float = Field(20.0, gt=0, description="Similarity scale of both losses.")


class RetrieverOptim(StrictModel):
    """One short epoch: the retriever trains on 2 shared CPU cores."""

    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (smoke runs).")


class RetrieverCV(StrictModel):
    """Query-grouped k-fold CV over train+val: the losses compared and the fusions tried."""

    folds: int = Field(4, ge=2)
    fold_seed: int = 1234
    losses: tuple[RetrieverLoss, ...] = ("mnrl", "cosent")
    recall_at: tuple[int, ...] = (100, 500)
    rrf_k: int = Field(DEFAULT_RRF_K, ge=0)
    zscore_weights: tuple[float, ...] = Field(
        (0.3, 0.5, 0.7), description="Dense weights tried for z-score fusion (BM25 gets 1 - w)."
    )
    candidates: int = Field(100, ge=1, description="The N at which fusions are compared (Recall@N).")

    @model_validator(mode="after")
    def _weights(self) -> RetrieverCV:
        if any(not 0.0 <= w <= 1.0 for w in self.zscore_weights):
            raise ValueError(f"cv.zscore_weights {list(self.zscore_weights)}: expected values in [0, 1].")
        if not self.losses:
            raise ValueError("cv.losses: expected at least one of mnrl, cosent.")
        return self


class RetrieverOutput(StrictModel):
    """``dir/model`` gets the final sentence-transformers folder; ``dir/cv.json`` the CV results."""

    dir: Path = Path("runs/retriever")


class RetrieverConfig(YamlConfig):
    """A whole retriever-training run."""

    KIND: ClassVar[str] = "retriever"
    EXAMPLE: ClassVar[str] = "configs/retriever.yaml"

    seed: int = 0
    cv_enabled: bool = Field(True, description="Run CV first and train the final model with its best loss.")
    data: RetrieverData = RetrieverData()
    model: RetrieverModel = RetrieverModel()
    loss: RetrieverLossSection = RetrieverLossSection()
    optim: RetrieverOptim = RetrieverOptim()
    cv: RetrieverCV = RetrieverCV()
    output: RetrieverOutput = RetrieverOutput()


#: Read a YAML retriever config, apply ``--set`` overrides and validate (``YamlConfig.load``).
load_retriever_config = RetrieverConfig.load
