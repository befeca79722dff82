"""Tail fine-tuning from a mid-layer cache: a trainable copy of the encoder's top K layers over the stored
hidden state of layer L-K. The corpus never goes through the encoder again; building the tail reads the
encoder's weights once (its top K layers).

Only encoders whose layers need nothing but the hidden states and a padding mask are supported: each layer
is called as `layer(hidden, attention_mask)`, with the mask built the way the encoder builds it. Encoders
whose layers also need relative-position tables, rotary caches or decoder caches are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featstore import install_hint
from featstore.errors import ConfigError, IncompatibleHeadError

from .packing import Packing

# Projection names of the BERT family's layers (attention q/k/v/output, feed-forward in/out): LoRA's targets.
BERT_LINEARS = ("query", "key", "value", "dense")


@dataclass(frozen=True)
class TailArchitecture:
    layers: str  # where the encoder keeps its layer list (a submodule path of its AutoModel)
    lora_targets: tuple[str, ...]  # names of the layers' linear maps that LoRA adapts


# One entry per supported `model_type`: the layer list, and the linear maps LoRA adapts.
TAIL_ARCHITECTURES: dict[str, TailArchitecture] = {
    "bert": TailArchitecture("encoder.layer", BERT_LINEARS),
    "roberta": TailArchitecture("encoder.layer", BERT_LINEARS),
    "xlm-roberta": TailArchitecture("encoder.layer", BERT_LINEARS),
    "camembert": TailArchitecture("encoder.layer", BERT_LINEARS),
    "electra": TailArchitecture("encoder.layer", BERT_LINEARS),
    "distilbert": TailArchitecture("transformer.layer", ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")),
}


def tail_architecture(model_type: str | None, model_class: str | None = None) -> TailArchitecture:
    """The supported architecture, or a ConfigError naming the encoder and what is supported."""
    if model_type not in TAIL_ARCHITECTURES:
        raise ConfigError(f"tail heads retrain encoder layers that need only hidden states and a padding mask; "
                          f"{model_class or 'this encoder'} (model_type {model_type!r}) is not supported (its "
                          "layers may need relative-position tables, rotary or decoder caches). Supported "
                          f"model types: {', '.join(TAIL_ARCHITECTURES)}. Train another head type on this store")
    return TAIL_ARCHITECTURES[model_type]


def tail_start_layer(num_hidden_states: int, tail_layers: int) -> int:
    """The stored hidden state a K-layer tail reads: L-K, L being the last (hidden state 0 = embeddings)."""
    last = num_hidden_states - 1
    if not 1 <= tail_layers <= last:
        raise ConfigError(f"--tail-layers must be between 1 and the encoder's {last} layers, got {tail_layers}")
    return last - tail_layers


class EncoderTail(nn.Module):
    """K encoder layers, rebuilt from the encoder's config (random until `copy_encoder_layers` or a saved
    state fills them), optionally with LoRA (PEFT) on their linear maps; dropout on the output, as a
    fine-tuned token classifier has before its classifier."""

    def __init__(self, encoder_config: dict[str, Any], num_layers: int, dropout: float, lora_rank: int = 0,
                 lora_alpha: float = 16.0) -> None:
        super().__init__()
        import transformers
        from transformers import AutoConfig, AutoModel

        if int(transformers.__version__.split(".")[0]) < 5:  # 4.x layers take other masks and return tuples
            raise ConfigError(f"tail heads need transformers >= 5 (installed: {transformers.__version__}); "
                              "pip install -U transformers")
        architecture = tail_architecture(encoder_config.get("model_type"))
        config = AutoConfig.for_model(**encoder_config)
        config.num_hidden_layers = num_layers  # DistilBERT maps it to n_layers
        self.config = config
        self.layers = AutoModel.from_config(config).get_submodule(architecture.layers)
        self.lora = lora_rank > 0
        if self.lora:
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError:
                raise ConfigError(f"LoRA tails need the PEFT library: {install_hint('lora')}") from None
            # PEFT freezes everything else in self.layers: only the low-rank deltas train
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=dropout,
                                               target_modules=list(architecture.lora_targets)), self.layers)
        self.dropout = nn.Dropout(dropout)
        self.output_size = config.hidden_size

    def forward(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """tokens (N, H): the stored layer L-K, packed -> layer L (N, H), dropout applied. The layers run on the
        padded grid, with the padding mask built as the encoder builds it."""
        from transformers.masking_utils import create_bidirectional_mask

        grid = packing.unpack(tokens)
        # positional: the embeddings' keyword was renamed within 5.x
        attention = create_bidirectional_mask(self.config, grid, packing.mask)
        for layer in self.layers:
            grid = layer(grid, attention)
        return self.dropout(packing.pack(grid))

    def frozen_keys(self) -> list[str]:
        """State keys that are the encoder's own weights under LoRA (not saved with the head): none otherwise."""
        return [key for key in self.state_dict() if "lora_" not in key] if self.lora else []

    def copy_encoder_layers(self, encoder_model: nn.Module) -> None:
        """This tail's weights from the top K layers of the live encoder (an AutoModel of the same type)."""
        architecture = tail_architecture(self.config.model_type, type(encoder_model).__name__)
        source_layers = encoder_model.get_submodule(architecture.layers)
        if len(source_layers) < len(self.layers):
            raise IncompatibleHeadError(f"the encoder has {len(source_layers)} layers, fewer than this tail's "
                                        f"{len(self.layers)}")
        for mine, theirs in zip(self.layers, source_layers[-len(self.layers):]):
            source = theirs.state_dict()
            # under LoRA, a linear map's own weight lives in `<name>.base_layer`
            wanted = {key: key.replace(".base_layer", "") for key in mine.state_dict() if "lora_" not in key}
            missing = sorted(set(wanted.values()) - set(source))
            if missing:
                raise IncompatibleHeadError(f"the encoder's layers lack {missing[:3]}: not the architecture the "
                                            "tail was built for")
            mine.load_state_dict({key: source[name] for key, name in wanted.items()}, strict=False)


def load_encoder_model(name_or_path: str | None, weights_sha256: str | None) -> nn.Module:
    """The encoder a tail copies its layers from, loaded on CPU, refused unless its weights are the ones the
    head's store was extracted with."""
    from featstore.extraction.encoder import FrozenEncoder

    encoder = FrozenEncoder.load(name_or_path, device="cpu", progress=False)
    if weights_sha256 and encoder.weights_sha256 != weights_sha256:
        raise IncompatibleHeadError(f"encoder {encoder.name_or_path} has weights {encoder.weights_sha256[:12]}, not "
                                    f"the {weights_sha256[:12]} the store was extracted with: a tail must start "
                                    "from the same encoder")
    return encoder.model
