"""Models: the multi-task reranker, the single-task cross-encoder, the listwise and LLM families,
their config and checkpoints."""

from esci_reranker.model.config import (
    LISTWISE,
    LLM,
    MULTI_TASK,
    SINGLE_TASK,
    CheckpointError,
    ModelConfig,
)
from esci_reranker.model.features import EncodedPairs, PairEncoder
from esci_reranker.model.io import load_checkpoint, save_checkpoint
from esci_reranker.model.listwise import ListwiseReranker  # registers itself in MODEL_CLASSES
from esci_reranker.model.modeling import (
    MODEL_CLASSES,
    CrossEncoderReranker,
    LossConfig,
    MultiTaskReranker,
    RerankerModel,
    RerankerOutput,
)

__all__ = [
    "LISTWISE",
    "LLM",
    "MODEL_CLASSES",
    "MULTI_TASK",
    "SINGLE_TASK",
    "CheckpointError",
    "CrossEncoderReranker",
    "EncodedPairs",
    "ListwiseReranker",
    "LossConfig",
    "ModelConfig",
    "MultiTaskReranker",
    "PairEncoder",
    "RerankerModel",
    "RerankerOutput",
    "load_checkpoint",
    "save_checkpoint",
]
