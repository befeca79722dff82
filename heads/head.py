"""`Head`: a layer mixer, word or sequence pooling, and a classifier/regressor — saved the HF way.

The same module runs on cached features (from a store) and on live encoder outputs: both
give it per-layer hidden states of the head's layers (padded (B, T, L, H), or packed (N, L, H) as the trainer's
batches are), a token mask and word ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from featstore.errors import HeadFormatError, IncompatibleHeadError
from featstore.sharing.location import resolve
from featstore.store.dataset import LABEL_PADDING
from featstore.store.reader import Store

from .card import CARD_NAME, TrainingRecord, render_model_card
from .config import HEAD_TYPES, EncoderIdentity, HeadConfig
from .context import BiLSTMContext, ConcatLayers, TransformerContext
from .crf import CRF
from .layers import Dropout, Linear, LinearChain, SequencePooling, pool_words
from .mixers import AdapterMixer, AttentionFusion, ScalarMix, SelectLayer
from .packing import Layout, Words, is_packed
from .tail import EncoderTail, load_encoder_model

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HEAD_FORMAT = "featstore-head/2"  # /2: extraction settings in their own section
READABLE_HEAD_FORMATS = ("featstore-head/1", HEAD_FORMAT)
WEIGHTS_DIGEST_KEY = "weights_sha256"  # in config.json: sha256 of model.safetensors
TRAINING_KEY = "training"  # in config.json: the TrainingRecord (heads.card), when the trainer saved the head


class Head(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        hidden, num_layers, outputs = config.hidden_size, len(config.layers), config.num_outputs
        # Identity at p=0: dropout would still copy the whole (B, T, L, H) feature tensor.
        self.feature_dropout = Dropout(config.feature_dropout) if config.feature_dropout else nn.Identity()
        mixer = config.context_input if HEAD_TYPES[config.head_type].context else config.head_type
        if mixer in ("linear", "mlp", "tail"):
            self.mixer: nn.Module = SelectLayer()
        elif mixer in ("scalar_mix", "mix"):
            self.mixer = ScalarMix(num_layers)
        elif mixer == "fusion":
            self.mixer = AttentionFusion(num_layers, hidden, config.dropout)
        elif mixer == "concat":
            self.mixer = ConcatLayers()
        else:
            self.mixer = AdapterMixer(hidden, config.attention_dim, config.num_heads, config.dropout,
                                      config.enable_tailor, config.tailor_attention)
        self.context = self._context(config, num_layers * hidden if mixer == "concat" else hidden)
        features = self.context.output_size if self.context is not None else hidden
        if config.head_type == "adapter":  # the notes' classifier: H -> 256 -> C, no nonlinearity (run as one map)
            self.classifier: nn.Module = LinearChain(nn.Linear(hidden, config.classifier_dim),
                                                     nn.Linear(config.classifier_dim, outputs))
        elif config.head_type == "mlp":
            self.classifier = nn.Sequential(Linear(hidden, config.mlp_dim), nn.GELU(), Dropout(config.dropout),
                                            Linear(config.mlp_dim, outputs))
        else:
            self.classifier = Linear(features, outputs)
        self.sequence_pooling = None if config.task_def.per_word else SequencePooling(config.sequence_pooling,
                                                                                      features)
        self.crf = CRF(outputs, config.label_names if config.crf_constraints else None) if config.crf else None
        # Word pooling (first subword, or the mean) is linear, so a linear classifier gives the same logits on
        # tokens, then pooled: pooling C logits instead of H features is the cheaper side when C < H (a layer
        # sweep's gathers of K heads' features were a third of its step, BENCHMARKS.md "Speed").
        self.classifies_tokens = isinstance(self.classifier, (nn.Linear, LinearChain)) and \
            outputs < self.classifier.in_features
        self.training_record: TrainingRecord | None = None  # how a loaded head was trained, when it says
        self.weights_sha256: str | None = None  # of model.safetensors, once saved or loaded

    @staticmethod
    def _context(config: HeadConfig, input_size: int) -> BiLSTMContext | TransformerContext | EncoderTail | None:
        if config.head_type == "tail":
            return EncoderTail(cast(dict, config.encoder_config), config.tail_layers, config.dropout, config.lora_rank,
                               config.lora_alpha)
        if config.head_type == "bilstm":
            return BiLSTMContext(input_size, config.context_dim, config.context_layers, config.dropout)
        if config.head_type == "transformer":
            return TransformerContext(input_size, config.hidden_size, config.context_layers, config.context_heads,
                                      config.context_dim, config.dropout)
        return None

    @property
    def tail(self) -> EncoderTail | None:
        """A tail head's encoder layers (heads/tail.py); None for other heads."""
        return self.context if isinstance(self.context, EncoderTail) else None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, word_ids: torch.Tensor | None = None,
                num_words: int | None = None, layout: Layout | None = None, packed_words: bool = False
                ) -> torch.Tensor:
        """Hidden states of the head's layers, padded (B, T, L, H) or packed (N, L, H: the real tokens of `mask`
        row by row, heads.packing) -> logits (B, W, C) for token tasks, (B, C) for classification, (B,) regression.

        Token tasks need `word_ids` (B, T) with -1 for special/padded tokens. Padding is never computed: a padded
        input is packed first, and only what mixes a sequence's tokens lays them out on a grid (the padded one, or
        the batch's bins: heads.packing). `layout`: where the batch's tokens (and words) are, when found already
        (the trainer's batches carry theirs). `packed_words`: token tasks' logits packed (Nw, C), in the order of
        `layout.words` (which must be given), rather than on the padded (B, W) grid (Task.losses reads them so).
        """
        layout = layout if layout is not None else Layout.of(mask)
        packing = layout.tokens
        tokens = self.mixer(self.feature_dropout(hidden if is_packed(hidden) else packing.pack(hidden)), packing)
        if self.context is not None:
            tokens = self.context(tokens, packing)
        if self.sequence_pooling is None:
            if word_ids is None:
                raise ValueError("token classification needs word_ids")
            words = layout.words
            if words is not None and num_words is not None and words.packing.mask.shape[1] != num_words:
                raise ValueError(f"the layout's words are laid out for {words.packing.mask.shape[1]} words per "
                                 f"sequence, not {num_words}")
            if words is None:
                if packed_words:
                    raise ValueError("packed word logits need the batch's word layout (layout.words)")
                width = num_words if num_words is not None else int(word_ids.max().item()) + 1
                words = Words.of(packing, packing.pack(word_ids), max(width, 1))
            if self.classifies_tokens:
                logits = pool_words(self.classifier(tokens), words, self.config.word_pooling)
            else:
                logits = self.classifier(pool_words(tokens, words, self.config.word_pooling))
            return logits if packed_words else words.packing.unpack(logits)  # padded words' logits are 0
        pooled = self.sequence_pooling(packing.unpack(tokens), mask)
        return self.config.task_def.shape_output(self.classifier(pooled))

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss: the task's, or a CRF's negative log-likelihood per word."""
        if self.crf is None:
            return self.config.task_def.loss(output, labels)
        words = labels != LABEL_PADDING
        return self.crf.nll(output, labels, words) / words.sum().clamp(min=1)

    def decode(self, output: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor | None:
        """A CRF's best tag sequences (B, W) for outputs (B, W, C) whose real words `words` marks (default: all);
        None for heads that decode by argmax (the task does)."""
        if self.crf is None:
            return None
        if words is None:
            words = torch.ones(output.shape[:2], dtype=torch.bool, device=output.device)
        return self.crf.viterbi(output, words)

    # --- persistence -------------------------------------------------------------------------------
    def _encoder_keys(self) -> set[str]:
        """State keys holding the encoder's own (frozen) weights, which a saved head leaves out: a LoRA tail's."""
        tail = self.tail
        return {f"context.{key}" for key in tail.frozen_keys()} if tail is not None else set()

    def save_pretrained(self, directory: str | Path, training: TrainingRecord | None = None) -> None:
        """Weights (safetensors), config.json (which records the weights' sha256 and, from the trainer, how the
        head was trained) and the model card (README.md). Each file is written whole and then renamed into place,
        config after the weights, so a reader never pairs a config with other weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()
                 if name not in self._encoder_keys()}
        weights = save(state, metadata={"format": HEAD_FORMAT})
        digest = hashlib.sha256(weights).hexdigest()
        config = {"format": HEAD_FORMAT, WEIGHTS_DIGEST_KEY: digest, **self.config.to_dict(),
                  **({TRAINING_KEY: training.to_dict()} if training is not None else {})}
        resolve(directory / WEIGHTS_NAME).write_bytes(weights)  # whole, then renamed into place
        resolve(directory / CONFIG_NAME).write_bytes(json.dumps(config, indent=2).encode())
        resolve(directory / CARD_NAME).write_bytes(render_model_card(self.config, training, digest).encode())
        self.training_record, self.weights_sha256 = training, digest

    @classmethod
    def from_pretrained(cls, directory: str | Path, encoder: str | None = None) -> Head:
        """A saved head, checked: config well-formed, weights matching their digest, every tensor in place.
        `encoder`: where a LoRA tail reads its encoder's layers (default: the encoder the head records; its
        weights hash is checked either way)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise HeadFormatError(f"{directory} is not a saved head (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            values = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise HeadFormatError(f"{config_path} is not valid JSON ({error}); the head is damaged or truncated") \
                from None
        if not isinstance(values, dict) or values.get("format") not in READABLE_HEAD_FORMATS:
            raise HeadFormatError(f"{config_path} is not a featstore head config (format "
                                  f"{values.get('format') if isinstance(values, dict) else None!r})")
        weights = weights_path.read_bytes()
        recorded, digest = values.get(WEIGHTS_DIGEST_KEY), hashlib.sha256(weights).hexdigest()
        if recorded is None:
            logger.warning("%s records no weights digest (saved by an older featstore): its weights cannot be "
                           "checked", config_path)
        elif digest != recorded:
            raise HeadFormatError(f"{weights_path} does not match the sha256 recorded in {config_path}: the weights "
                                  "are damaged or were replaced; save the head again")
        try:
            head = cls(HeadConfig.from_dict(values))
            encoder_keys = head._encoder_keys()
            if encoder_keys:  # a LoRA tail saves only its deltas: the rest is its encoder's own layers
                tail = cast(EncoderTail, head.tail)
                tail.copy_encoder_layers(load_encoder_model(encoder or head.config.encoder.name_or_path,
                                                            head.config.encoder.weights_sha256))
            missing, unexpected = head.load_state_dict(load(weights), strict=False)
            if unexpected or set(missing) - encoder_keys:
                raise KeyError(f"weights missing {sorted(set(missing) - encoder_keys)[:5]}, unexpected "
                               f"{sorted(unexpected)[:5]}")
            if isinstance(values.get(TRAINING_KEY), dict):
                head.training_record = TrainingRecord.from_dict(values[TRAINING_KEY])
            head.weights_sha256 = digest
        except (ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as error:
            raise HeadFormatError(f"{directory} holds a malformed head: {type(error).__name__}: {error}") from None
        return head.eval()


def check_store(config: HeadConfig, store: Store, where: str) -> None:
    """Refuse a store the head cannot be trained or evaluated on (task, encoder, layers), before any epoch."""
    if store.task != config.task:
        raise IncompatibleHeadError(f"head '{config.name}' is a {config.task} head but {where} holds a {store.task} "
                                    "corpus; use a store of the same task")
    check_compatible(config, EncoderIdentity.of(store.manifest.encoder), store.layers, where)


def check_compatible(config: HeadConfig, identity: EncoderIdentity, available_layers: list[int], where: str) -> None:
    """Refuse a store or encoder whose features the head was not trained on."""
    trained = config.encoder
    if trained.weights_sha256 and trained.weights_sha256 != identity.weights_sha256:
        raise IncompatibleHeadError(f"head '{config.name}' was trained on encoder {trained.name_or_path} (weights "
                                    f"{trained.weights_sha256[:12]}) but {where} uses {identity.name_or_path} "
                                    f"(weights {(identity.weights_sha256 or '?')[:12]}); use features of the same "
                                    "encoder")
    if config.hidden_size != identity.hidden_size:
        raise IncompatibleHeadError(f"head '{config.name}' expects hidden size {config.hidden_size} but {where} has "
                                    f"{identity.hidden_size}")
    missing = [layer for layer in config.layers if layer not in available_layers]
    if missing:
        raise IncompatibleHeadError(f"head '{config.name}' reads layers {config.layers} but {where} lacks {missing} "
                                    f"(it has {available_layers})")
