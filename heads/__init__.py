"""heads: train small heads on cached encoder features, evaluate them, attach them to the live encoder."""

from .adapter import Adapter
from .config import HEAD_TYPES, HeadConfig
from .head import Head
from .predict import Predictor
from .trainer import TrainConfig, Trainer, evaluate_heads, train

__all__ = ["HEAD_TYPES", "Adapter", "Head", "HeadConfig", "Predictor", "TrainConfig", "Trainer", "evaluate_heads",
           "train"]
