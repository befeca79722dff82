"""Task metrics: entity-level micro F1 (seqeval) for tagging, accuracy and macro F1 for
classification, Pearson/Spearman for regression (each task's primary metric is named in tasks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def tagging_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level micro precision/recall/F1, token accuracy, and `per_type`: precision/recall/F1/support
    of each entity type (seqeval's report)."""
    from seqeval.metrics import classification_report

    tokens = sum(len(tags) for tags in gold)
    correct = sum(g == p for tags, preds in zip(gold, predicted) for g, p in zip(tags, preds))
    # One pass of seqeval: the report's micro average is its micro P/R/F1 (calling f1_score & co. as well took
    # 12x the time of the report, and every epoch evaluates every head)
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    per_type = {name: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                       "f1": float(row["f1-score"]), "support": int(row["support"])}
                for name, row in report.items() if not name.endswith(" avg")}
    return {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "token_accuracy": correct / max(tokens, 1), "per_type": per_type}


def classification_metrics(gold: np.ndarray, predicted: np.ndarray, num_labels: int) -> dict[str, float]:
    f1s = []
    for label in range(num_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(gold == predicted)), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


def regression_metrics(gold: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(gold) < 2 or np.std(predicted) == 0 or np.std(gold) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((gold - predicted) ** 2))}
    return {"pearson": float(pearsonr(gold, predicted)[0]), "spearman": float(spearmanr(gold, predicted)[0]),
            "mse": float(np.mean((gold - predicted) ** 2))}
