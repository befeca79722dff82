"""heads: train small heads on cached encoder features, evaluate them, attach them to the live encoder.

Public names are imported lazily (featstore.lazy), so `featstore` can find the `demo` command this
package adds without importing torch.
"""

from typing import TYPE_CHECKING

from featstore.lazy import lazy_exports

_EXPORTS = {
    "Adapter": ".adapter", "HEAD_TYPES": ".config", "HeadConfig": ".config", "Head": ".head",
    "Predictor": ".predict", "TASKS": ".tasks", "Task": ".tasks", "TrainConfig": ".trainer", "Trainer": ".trainer",
    "evaluate_heads": ".trainer", "train": ".trainer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import HEAD_TYPES, HeadConfig
    from .head import Head
    from .predict import Predictor
    from .tasks import TASKS, Task
    from .trainer import TrainConfig, Trainer, evaluate_heads, train

__all__ = ["HEAD_TYPES", "TASKS", "Adapter", "Head", "HeadConfig", "Predictor", "Task", "TrainConfig", "Trainer",
           "evaluate_heads", "train"]
