"""Head configuration: everything needed to rebuild a head and to check where it may be used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from featstore.store.manifest import EncoderInfo, ExtractionInfo

from .tasks import TASKS, Task

IdentityT = TypeVar("IdentityT")


@dataclass(frozen=True)
class HeadType:
    """What a head type brings to training besides its module: its learning rate and the layers it reads
    when none are named. The probes' and mixes' learning rates are the best or tied best of grids on a small chunking
    corpus and on CoNLL-2003 NER; the adapter's is the paper's (BENCHMARKS.md, "Defaults")."""

    lr: float
    single_layer: bool = False  # a probe: reads one layer (chosen by a quick sweep when none is named)
    context: bool = False  # a sequence-context block (heads/context.py) runs between the mixer and the classifier
    tail: bool = False  # retrains the encoder's top layers (heads/tail.py) over the stored layer below them
    lora_lr: float | None = None  # the learning rate with LoRA (lora_rank > 0), for heads that take it
    epochs: int | None = None  # epochs when none are given (None: the trainer's rule, heads.trainer.default_epochs)
    batched: bool = False  # heads of this type with equal shapes train as one batched module (heads/grouped.py)
    # ... by default on the CPU too (--batch-heads auto): heads whose step is mostly per-operation overhead, which
    # the batched module pays once (on a 2-core CPU a sweep of 7 linear probes 1.97x faster batched; adapters no
    # faster, mlp probes 1.25x, scalar mixes (since their layer mix is one matrix product) 1.2-1.4x and fusions
    # 1.4-1.8x slower: BENCHMARKS.md, "Speed", runs 7 to 10)
    batched_on_cpu: bool = False


HEAD_TYPES: dict[str, HeadType] = {
    "adapter": HeadType(lr=1e-3, batched=True),
    "linear": HeadType(lr=1e-2, single_layer=True, batched=True, batched_on_cpu=True),
    "scalar_mix": HeadType(lr=1e-2, batched=True),
    "mlp": HeadType(lr=3e-3, single_layer=True, batched=True),
    "fusion": HeadType(lr=1e-2, batched=True),
    # Not yet on the grid: the usual Adam rates for a BiLSTM tagger and for small post-LN-free transformer layers
    "bilstm": HeadType(lr=1e-3, context=True),
    "transformer": HeadType(lr=5e-4, context=True),
    # Fine-tuning's usual few epochs: the tail is pre-trained, and each of its epochs costs encoder layers
    "tail": HeadType(lr=1e-4, tail=True, lora_lr=5e-4, epochs=3),
}
CONTEXT_INPUTS = ("mix", "concat", "adapter")  # what a context head reads: scalar mix, layers side by side, adapter


def default_lr(config: HeadConfig) -> float:
    """A head's learning rate when none is given: its type's (its type's LoRA rate under LoRA)."""
    kind = HEAD_TYPES[config.head_type]
    return kind.lora_lr if config.lora_rank and kind.lora_lr is not None else kind.lr


def is_probe(head_type: str) -> bool:
    """A known head type that reads one layer."""
    return head_type in HEAD_TYPES and HEAD_TYPES[head_type].single_layer


def default_probe_layer(stored_layers: list[int], num_hidden_states: int) -> int:
    """The layer a probe reads when none is named and there is no eval store to sweep on: the stored layer
    nearest two thirds of the encoder's depth (probing studies find the upper-middle layers carry the most
    transferable token features; the last layers lean towards the pre-training objective)."""
    target = 2 * (num_hidden_states - 1) / 3
    return min(stored_layers, key=lambda layer: (abs(layer - target), -layer))


@dataclass
class EncoderIdentity:
    """What ties a head to its encoder: recorded in the head, checked wherever it is used."""

    name_or_path: str | None = None
    weights_sha256: str | None = None
    tokenizer_sha256: str | None = None
    hidden_size: int | None = None
    num_hidden_states: int | None = None

    @classmethod
    def of(cls, encoder: EncoderInfo) -> EncoderIdentity:
        return _project(cls, encoder)


@dataclass
class ExtractionIdentity:
    """How the head's training features were computed; prediction computes live features the same way."""

    max_length: int | None = None
    stride: int | None = None
    storage_dtype: str | None = None

    @classmethod
    def of(cls, extraction: ExtractionInfo) -> ExtractionIdentity:
        return _project(cls, extraction)


@dataclass
class HeadConfig:
    """A head's architecture, task and provenance (saved as config.json)."""

    head_type: str
    task: str  # a name in heads.tasks.TASKS (the store's task)
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
    # bilstm / transformer heads (heads/context.py)
    context_input: str = "mix"  # one of CONTEXT_INPUTS
    context_layers: int = 1  # LSTM or transformer layers
    context_dim: int = 256  # bilstm: units per direction; transformer: feed-forward width
    context_heads: int = 4  # transformer: attention heads
    crf: bool = False  # tagging: a linear-chain CRF on the word outputs (heads/crf.py)
    crf_constraints: bool = True  # with a CRF and BIO tags: decoding never takes an invalid transition
    # tail heads (heads/tail.py): the encoder's top `tail_layers` layers retrained over stored layer L-K
    tail_layers: int = 1
    lora_rank: int = 0  # 0: every tail weight trains; > 0: only LoRA deltas of this rank (PEFT)
    lora_alpha: float = 16.0  # LoRA's scale numerator (the deltas are scaled by lora_alpha / lora_rank)
    encoder_config: dict[str, Any] | None = None  # tail heads: the encoder's HF config, to rebuild its layers
    # provenance: the encoder, extraction settings and store the head was trained on
    encoder: EncoderIdentity = field(default_factory=EncoderIdentity)
    extraction: ExtractionIdentity = field(default_factory=ExtractionIdentity)
    store_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {self.head_type!r}; choose one of {', '.join(HEAD_TYPES)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if is_probe(self.head_type) and len(self.layers) != 1:
            raise ValueError(f"a {self.head_type} head reads exactly one layer, got {self.layers}")
        self.task_def.check_labels(self.label_names)
        if self.crf and not self.task_def.per_word:
            raise ValueError(f"a CRF decodes tag sequences: it needs a token-classification task, not {self.task}")
        if HEAD_TYPES[self.head_type].context:
            if self.context_input not in CONTEXT_INPUTS:
                raise ValueError(f"context_input must be one of {', '.join(CONTEXT_INPUTS)}, got "
                                 f"{self.context_input!r}")
            if self.context_layers < 1 or self.context_dim < 1 or self.context_heads < 1:
                raise ValueError("context_layers, context_dim and context_heads must be at least 1")
            if self.head_type == "transformer" and self.hidden_size % self.context_heads:
                raise ValueError(f"a transformer head's width {self.hidden_size} is not divisible by "
                                 f"{self.context_heads} attention heads (context_heads)")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        if HEAD_TYPES[self.head_type].tail:
            if self.encoder_config is None:
                raise ValueError("a tail head needs the encoder's config (encoder_config) to rebuild its layers")
            start = (self.encoder.num_hidden_states or 0) - 1 - self.tail_layers
            if self.encoder.num_hidden_states and self.layers != [start]:
                raise ValueError(f"a tail of {self.tail_layers} layer(s) reads stored layer {start} (the last minus "
                                 f"tail_layers), not {self.layers}")
        elif self.lora_rank:
            raise ValueError(f"LoRA (lora_rank) adapts a tail head's encoder layers; a {self.head_type} head has none")

    @property
    def task_def(self) -> Task:
        """The task's behaviour: loss, decoding, metrics (heads.tasks)."""
        return TASKS[self.task]

    @property
    def num_outputs(self) -> int:
        return self.task_def.num_outputs(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        """Tolerates unknown keys; reads the first format's layout (extraction settings inside `encoder`)."""
        encoder = dict(values.get("encoder") or {})
        moved = {item.name: encoder.pop(item.name) for item in fields(ExtractionIdentity) if item.name in encoder}
        return _known(cls, {**values, "encoder": _known(EncoderIdentity, encoder),
                            "extraction": _known(ExtractionIdentity, {**moved, **(values.get("extraction") or {})})})


def _project(cls: type[IdentityT], source: Any) -> IdentityT:
    """The fields of `cls` taken from a manifest section of the same field names."""
    return cls(**{item.name: getattr(source, item.name) for item in fields(cls)})


def _known(cls: type, values: dict[str, Any]) -> Any:
    names = {item.name for item in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})
