"""Head configuration: everything needed to rebuild a head and to check where it may be used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

HEAD_TYPES = ("adapter", "linear", "scalar_mix", "mlp", "fusion")
SINGLE_LAYER_HEADS = ("linear", "mlp")
TOKEN_CLASSIFICATION = "token-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
REGRESSION = "regression"


@dataclass
class HeadConfig:
    """A head's architecture, task and provenance (saved as config.json)."""

    head_type: str
    task: str
    hidden_size: int
    layers: list[int]  # encoder hidden-state indices the head reads (0 = embeddings)
    label_names: list[str] | None = None
    name: str = "head"
    word_pooling: str = "first"  # token tasks: first | mean subword
    sequence_pooling: str = "mean"  # sequence tasks: first | mean | attention
    # adapter (Basirat 2024; defaults from the design notes)
    attention_dim: int = 16
    num_heads: int = 2
    enable_tailor: bool = True
    tailor_attention: bool = True
    classifier_dim: int = 256
    dropout: float = 0.1
    feature_dropout: float = 0.0  # dropout on the cached features, a stand-in for encoder dropout
    mlp_dim: int = 256
    # provenance: the encoder and store the head was trained on
    encoder: dict[str, Any] = field(default_factory=dict)
    store_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {self.head_type!r}; choose one of {', '.join(HEAD_TYPES)}")
        if self.task not in (TOKEN_CLASSIFICATION, SEQUENCE_CLASSIFICATION, REGRESSION):
            raise ValueError(f"unknown task {self.task!r}")
        if self.head_type in SINGLE_LAYER_HEADS and len(self.layers) != 1:
            raise ValueError(f"a {self.head_type} head reads exactly one layer, got {self.layers}")
        if self.task != REGRESSION and not self.label_names:
            raise ValueError("classification heads need label names")

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == REGRESSION else len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
