"""Attach a trained head to the live encoder and predict on raw text or pre-split words.

Features go through the same path as extraction (`FrozenEncoder.tokenize/forward`, the stored
dtype, the store's windows) and the same collation as training, so live predictions equal
predictions on the store for the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore import Example, FrozenEncoder, collate_features
from featstore.errors import ConfigError
from featstore.store.reader import SequenceFeatures

from .config import EncoderIdentity
from .entities import entity_spans, is_bio
from .head import Head, check_compatible


class Predictor:
    def __init__(self, head: str | Path | Head, model: str | None = None, device: str | None = None,
                 max_batch_tokens: int = 8192, progress: bool = True) -> None:
        self.head = head if isinstance(head, Head) else Head.from_pretrained(head, encoder=model)
        config = self.head.config
        self.encoder = FrozenEncoder.load(model or config.encoder.name_or_path, device=device,
                                          dtype=config.extraction.storage_dtype, progress=progress)
        check_compatible(config, EncoderIdentity.of(self.encoder.describe()),
                         list(range(self.encoder.num_hidden_states)), f"encoder {self.encoder.name_or_path}")
        self.head.to(self.encoder.device).eval()
        self.max_batch_tokens = max_batch_tokens

    def _examples(self, inputs: Sequence[str | Sequence[str]]
                  ) -> tuple[list[Example], list[list[tuple[int, int]] | None]]:
        """Examples, and for raw text given to a token task, the character offsets of its words."""
        examples, offsets = [], []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                if not item.strip():
                    raise ConfigError(f"input {index} is empty")
                if self.head.config.task_def.per_word:  # token tasks label words: split as the tokenizer does
                    words = self.encoder.split_words(item)
                    examples.append(Example(words=tuple(word for word, _ in words)))
                    offsets.append([span for _, span in words])
                else:
                    examples.append(Example(text=item))
                    offsets.append(None)
            else:
                if not item:
                    raise ConfigError(f"input {index} has no words")
                examples.append(Example(words=tuple(item)))
                offsets.append(None)
        return examples, offsets

    def outputs(self, inputs: Sequence[str | Sequence[str]], batch_size: int = 32) -> list[torch.Tensor]:
        """Raw head outputs per input: (W, C) logits, (C,) logits, or a scalar."""
        return self._outputs(self._examples(inputs)[0], batch_size)

    @torch.no_grad()
    def _outputs(self, examples: list[Example], batch_size: int) -> list[torch.Tensor]:
        extraction = self.head.config.extraction
        sequences = self.encoder.tokenize(examples, extraction.max_length, extraction.stride)
        results: list[torch.Tensor] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start: start + batch_size]
            hidden = self.encoder.features(chunk, self.head.config.layers, self.max_batch_tokens)
            offsets = np.cumsum([0] + [sequence.num_tokens for sequence in chunk])
            items = [SequenceFeatures(start + i, hidden[offsets[i]: offsets[i + 1]], s.input_ids, s.word_ids,
                                      s.num_words, None) for i, s in enumerate(chunk)]
            batch = collate_features(items)
            device = self.encoder.device
            output = self.head(batch["hidden_states"].to(device), batch["mask"].to(device),
                               batch["word_ids"].to(device)).cpu()
            for i, sequence in enumerate(chunk):
                results.append(output[i, : sequence.num_words] if output.dim() == 3 else output[i])
        return results

    def predict(self, inputs: Sequence[str | Sequence[str]], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per input: word tags with scores (and, for BIO tag sets, entity spans with type, score and, for raw
        text, character offsets), or a label with probabilities, or a regression value."""
        config = self.head.config
        records = []
        examples, offsets = self._examples(inputs)
        for item, example, spans, output in zip(inputs, examples, offsets, self._outputs(examples, batch_size)):
            if not config.task_def.per_word:
                records.append({"input": item, **config.task_def.record(output, config.label_names)})
                continue
            decoded = self.head.decode(output[None].to(self.encoder.device))  # a CRF's path, on the head's device
            path = None if decoded is None else decoded[0].cpu()
            record = {**({"text": item} if isinstance(item, str) else {}), "words": list(example.words),
                      **config.task_def.record(output, config.label_names, path)}
            if is_bio(config.label_names):
                record["entities"] = entity_spans(record["words"], record["tags"], record["scores"], spans,
                                                  item if isinstance(item, str) else None)
            records.append(record)
        return records


def read_inputs(path: str | Path) -> list[str | list[str]]:
    """JSONL lines with "words" (a list) or "text"; or a text file with one input per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"input file {path} is empty")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return lines
    inputs: list[str | list[str]] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        value = record.get("words", record.get("tokens", record.get("text"))) if isinstance(record, dict) else None
        if not isinstance(value, (str, list)):
            raise ConfigError(f"{path}:{number}: expected an object with \"words\" (a list) or \"text\"")
        inputs.append(value)
    return inputs
