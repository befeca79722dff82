import numpy as np
import pytest

from heads.metrics import classification_metrics, regression_metrics, tagging_metrics


def test_entity_level_f1_counts_whole_entities():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["B-PER", "O", "O", "B-LOC"]]  # PER span broken: 1 of 2 entities right
    metrics = tagging_metrics(gold, predicted)
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["token_accuracy"] == pytest.approx(0.75)


def test_micro_figures_equal_seqeval_scores():
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG"]
    gold = [list(rng.choice(tags, size=rng.integers(1, 12))) for _ in range(300)]
    predicted = [[tag if rng.random() < 0.7 else str(rng.choice(tags)) for tag in row] for row in gold]
    metrics = tagging_metrics(gold, predicted)
    assert metrics["f1"] == pytest.approx(f1_score(gold, predicted))
    assert metrics["precision"] == pytest.approx(precision_score(gold, predicted))
    assert metrics["recall"] == pytest.approx(recall_score(gold, predicted))
    assert 0.3 < metrics["f1"] < 0.9


def test_classification_accuracy_and_macro_f1():
    metrics = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_regression_correlations():
    gold = np.array([1.0, 2.0, 3.0, 4.0])
    metrics = regression_metrics(gold, np.array([1.0, 3.0, 2.9, 10.0]))
    assert metrics["spearman"] == pytest.approx(0.8)
    assert 0.8 < metrics["pearson"] < 1
