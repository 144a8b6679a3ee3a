"""Models: the multi-task reranker, the single-task cross-encoder, their config and checkpoints."""

from esci_reranker.model.config import (
    MULTI_TASK,
    SINGLE_TASK,
    CheckpointError,
    ModelConfig,
)
from esci_reranker.model.features import EncodedPairs, PairEncoder
from esci_reranker.model.io import load_checkpoint, save_checkpoint
from esci_reranker.model.modeling import (
    MODEL_CLASSES,
    CrossEncoderReranker,
    LossConfig,
    MultiTaskReranker,
    RerankerModel,
    RerankerOutput,
)

__all__ = [
    "MODEL_CLASSES",
    "MULTI_TASK",
    "SINGLE_TASK",
    "CheckpointError",
    "CrossEncoderReranker",
    "EncodedPairs",
    "LossConfig",
    "ModelConfig",
    "MultiTaskReranker",
    "PairEncoder",
    "RerankerModel",
    "RerankerOutput",
    "load_checkpoint",
    "save_checkpoint",
]
