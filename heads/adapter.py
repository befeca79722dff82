"""The published API: `adapter = Adapter(encoder)` wraps a live Hugging Face encoder.

The encoder is frozen (no gradients, eval mode unless asked otherwise) and only the head's
parameters train. The head inside is the same `Head` class that trains from a store, so a
head trained either way can be saved and used the other way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featstore.extraction.corpus import TOKEN_CLASSIFICATION

from .config import HeadConfig
from .head import Head


class Adapter(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int | None = None, label_names: list[str] | None = None,
                 task: str = TOKEN_CLASSIFICATION, encoder_train_mode: bool = False, head: Head | None = None,
                 **head_options: Any) -> None:
        """`encoder_train_mode=True` keeps the frozen encoder's dropout active, as the reference's live
        training did (HF Trainer calls model.train()); the default eval mode matches cached features."""
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder_train_mode = encoder_train_mode
        if head is None:
            if label_names is None:
                label_names = [str(i) for i in range(num_labels or 2)]
            config = HeadConfig(head_type=head_options.pop("head_type", "adapter"), task=task,
                                hidden_size=encoder.config.hidden_size,
                                layers=list(range(encoder.config.num_hidden_layers + 1)), label_names=label_names,
                                **head_options)
            head = Head(config)
        self.head = head
        self.train(False)

    def train(self, mode: bool = True) -> Adapter:
        super().train(mode)
        self.encoder.train(mode and self.encoder_train_mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.head.parameters() if parameter.requires_grad]

    def encoder_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's hidden states of the head's layers, stacked: (B, T, L, H)."""
        with torch.no_grad():
            outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                   return_dict=True)
        return torch.stack([outputs.hidden_states[layer] for layer in self.head.config.layers], dim=2).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits per word (B, W, C) given word ids (-1 for special/padding), else per token (B, T, C)."""
        mask = attention_mask.bool()
        if word_ids is None and self.head.config.task_def.per_word:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            word_ids = positions.masked_fill(~mask, -1)
        return self.head(self.encoder_features(input_ids, attention_mask), mask, word_ids)
