"""Training: typed YAML configs and the accelerate training loop with early stopping and resume."""

from esci_reranker.train.config import ConfigError, TrainConfig, load_config
from esci_reranker.train.loop import Trainer, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "Trainer", "load_config", "train"]
