"""What a task means for a head, in one place: outputs, loss, decoding, metrics, the primary metric,
label padding and prediction records. Heads, the trainer, evaluation and prediction ask the task
object; none of them branches on the task's name.

Task names are the store's (featstore.extraction.corpus): a head trains on a store of its task.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from featstore.extraction.corpus import REGRESSION, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from featstore.store.dataset import LABEL_PADDING

from .entities import is_bio, repair_bio
from .metrics import classification_metrics, regression_metrics, tagging_metrics
from .packing import Layout


class Task(ABC):
    name: ClassVar[str]
    primary_metric: ClassVar[str]  # early stopping and "best" compare this metric (higher is better)
    per_word: ClassVar[bool]  # outputs one prediction per word (else one per sequence)
    labeled_by_name: ClassVar[bool] = True  # labels are class ids with names

    def num_outputs(self, label_names: Sequence[str] | None) -> int:
        return len(label_names or ())

    def check_labels(self, label_names: Sequence[str] | None) -> None:
        if self.labeled_by_name and not label_names:
            raise ValueError("classification heads need label names")

    def shape_output(self, output: torch.Tensor) -> torch.Tensor:
        """The head's raw output as this task's prediction tensor."""
        return output

    def num_words(self, labels: torch.Tensor) -> int | None:
        """How many words the labels of a batch cover (per-word tasks), so outputs line up with them."""
        return None

    @abstractmethod
    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def losses(self, outputs: torch.Tensor, labels: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(K,): `loss` of each of K heads' outputs, stacked (K, ...), on the same labels (heads/grouped.py); per-word
        tasks' outputs are packed (Head.forward's `packed_words`, in the order of `layout.words`)."""
        return torch.stack([self.loss(output, labels) for output in outputs])

    @abstractmethod
    def rows(self, output: torch.Tensor, labels: torch.Tensor, decoded: torch.Tensor | None = None
             ) -> Iterator[tuple[Any, Any]]:
        """(gold, predicted) per sequence of a batch, labels padding removed. `decoded`: label ids the head
        decoded itself (a CRF's Viterbi path), used instead of each output's argmax."""

    @abstractmethod
    def metrics(self, gold: list[Any], predicted: list[Any], label_names: Sequence[str] | None) -> dict[str, float]:
        ...

    @abstractmethod
    def record(self, output: torch.Tensor, label_names: Sequence[str] | None, decoded: torch.Tensor | None = None
               ) -> dict[str, Any]:
        """The prediction of one input as JSON-able fields (`decoded` as for `rows`)."""


class TokenClassification(Task):
    name = TOKEN_CLASSIFICATION
    primary_metric = "f1"
    per_word = True

    def num_words(self, labels: torch.Tensor) -> int | None:
        return labels.shape[1]

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over the real words of output (B, W, C)."""
        # classes on dim 1, (B, C, W): the CPU's log-softmax over a short last dim (a few labels) runs row by row,
        # 3x slower for a batch's words than over dim 1 (BENCHMARKS.md, "Speed"); the same loss
        return nn.functional.cross_entropy(output.transpose(1, 2), labels, ignore_index=LABEL_PADDING)

    def losses(self, outputs: torch.Tensor, labels: torch.Tensor, layout: Layout) -> torch.Tensor:
        """`loss` of K heads' packed word logits (K, Nw, C) in one call, over the words some token belongs to
        (`layout.words`) rather than the padded (B, W) grid, which shuffled CoNLL-2003 batches fill 3x over: the
        loss of 7 probes' step took half the time (BENCHMARKS.md, "Speed"). A labelled word no token belongs to
        has zero logits in `loss`'s padded output: a cross-entropy of log(C) and no gradient, added as such."""
        word_labels = layout.words.packing.pack(labels)  # (Nw,)
        per_word = nn.functional.cross_entropy(outputs.transpose(1, 2), word_labels.expand(len(outputs), -1),
                                               ignore_index=LABEL_PADDING, reduction="none")  # classes on dim 1: loss
        labelled = (labels != LABEL_PADDING).sum()
        without_tokens = labelled - (word_labels != LABEL_PADDING).sum()
        return (per_word.sum(1) + without_tokens * math.log(outputs.shape[-1])) / labelled

    def rows(self, output: torch.Tensor, labels: torch.Tensor, decoded: torch.Tensor | None = None
             ) -> Iterator[tuple[Any, Any]]:
        predicted = output.argmax(-1) if decoded is None else decoded
        for row_predicted, row_labels in zip(predicted, labels):
            keep = row_labels != LABEL_PADDING
            yield row_labels[keep].tolist(), row_predicted[keep].tolist()

    def metrics(self, gold: list[Any], predicted: list[Any], label_names: Sequence[str] | None) -> dict[str, float]:
        names = list(label_names or ())
        return tagging_metrics([[names[i] for i in row] for row in gold],
                               [[names[i] for i in row] for row in predicted])

    def record(self, output: torch.Tensor, label_names: Sequence[str] | None, decoded: torch.Tensor | None = None
               ) -> dict[str, Any]:
        """Tags and the probability of each (the softmax of its word's output); BIO tag sets are repaired to
        valid BIO (heads/entities.py; a constrained CRF path already is), and the predictor adds the entity
        spans."""
        probabilities = output.softmax(-1)
        chosen = probabilities.argmax(-1) if decoded is None else decoded
        names = list(label_names or ())
        tags = [names[i] for i in chosen.tolist()]
        return {"tags": repair_bio(tags) if is_bio(names) else tags,
                "scores": [round(p, 6) for p in probabilities.gather(-1, chosen[:, None]).squeeze(-1).tolist()]}


class SequenceClassification(Task):
    name = SEQUENCE_CLASSIFICATION
    primary_metric = "accuracy"
    per_word = False

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, labels)

    def rows(self, output: torch.Tensor, labels: torch.Tensor, decoded: torch.Tensor | None = None
             ) -> Iterator[tuple[Any, Any]]:
        for row_output, label in zip(output, labels):
            yield int(label), int(row_output.argmax())

    def metrics(self, gold: list[Any], predicted: list[Any], label_names: Sequence[str] | None) -> dict[str, float]:
        return classification_metrics(np.array(gold), np.array(predicted), self.num_outputs(label_names))

    def record(self, output: torch.Tensor, label_names: Sequence[str] | None, decoded: torch.Tensor | None = None
               ) -> dict[str, Any]:
        probabilities = output.softmax(-1).tolist()
        names = list(label_names or ())
        return {"label": names[int(np.argmax(probabilities))], "probabilities": dict(zip(names, probabilities))}


class Regression(Task):
    name = REGRESSION
    primary_metric = "pearson"
    per_word = False
    labeled_by_name = False

    def num_outputs(self, label_names: Sequence[str] | None) -> int:
        return 1

    def shape_output(self, output: torch.Tensor) -> torch.Tensor:
        return output.squeeze(-1)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(output, labels.float())

    def rows(self, output: torch.Tensor, labels: torch.Tensor, decoded: torch.Tensor | None = None
             ) -> Iterator[tuple[Any, Any]]:
        for value, target in zip(output, labels):
            yield float(target), float(value)

    def metrics(self, gold: list[Any], predicted: list[Any], label_names: Sequence[str] | None) -> dict[str, float]:
        return regression_metrics(np.array(gold), np.array(predicted))

    def record(self, output: torch.Tensor, label_names: Sequence[str] | None, decoded: torch.Tensor | None = None
               ) -> dict[str, Any]:
        return {"value": float(output)}


TASKS: dict[str, Task] = {task.name: task for task in (TokenClassification(), SequenceClassification(), Regression())}
