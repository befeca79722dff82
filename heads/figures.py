"""The figures of `heads sweep` and `heads report`, drawn with matplotlib's object API (no pyplot, so no GUI
backend and no global state) and written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def probing_curve(curves: dict[str, dict[int, float]], metric: str, path: Path, title: str) -> Path:
    """The primary metric per encoder layer (0 = embeddings), one line per probe type."""
    figure = Figure(figsize=(6, 3.6))
    axes = figure.add_subplot()
    for name, scores in curves.items():
        layers = sorted(scores)
        axes.plot(layers, [scores[layer] for layer in layers], marker="o", label=name)
        best = max(layers, key=scores.__getitem__)
        axes.annotate(f"{scores[best]:.3f}", (best, scores[best]), textcoords="offset points", xytext=(0, 6),
                      ha="center", fontsize=8)
    axes.set(xlabel="layer (0 = embeddings)", ylabel=metric, title=title)
    axes.margins(y=0.15)  # room for the best score's label
    axes.set_xticks(sorted({layer for scores in curves.values() for layer in scores}))
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    return _save(figure, path)


def learning_curves(train: dict[str, tuple[list[int], list[float]]], evaluation: dict[str, tuple[list[int],
                    list[float]]], metric: str, path: Path) -> Path:
    """Training loss per optimiser step and the eval metric per epoch, one line per head."""
    figure = Figure(figsize=(10, 3.6))
    loss_axes, eval_axes = figure.subplots(1, 2)
    for name, (steps, losses) in train.items():
        loss_axes.plot(steps, losses, label=name, linewidth=1)
    loss_axes.set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    for name, (epochs, values) in evaluation.items():
        eval_axes.plot(epochs, values, marker="o", label=name)
    eval_axes.set(xlabel="epoch", ylabel=metric, title=f"eval {metric}" if evaluation else "no eval store")
    for axes in (loss_axes, eval_axes):
        axes.grid(alpha=0.3)
        if len(train) > 1:
            axes.legend(fontsize=8)
    return _save(figure, path)


def per_label_bars(per_label: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Precision, recall and F1 of each label (or entity type), grouped bars."""
    names = sorted(per_label)
    figure = Figure(figsize=(max(5, 0.9 * len(names) + 2), 3.6))
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    for offset, key in zip((-0.27, 0, 0.27), ("precision", "recall", "f1")):
        axes.bar(positions + offset, [per_label[name][key] for name in names], width=0.27, label=key)
    axes.set_xticks(positions, names, rotation=30 if len(names) > 6 else 0)
    axes.set(ylim=(0, 1.05), title=title)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def heatmap(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path, title: str, xlabel: str,
            ylabel: str, value_format: str = "{:.2f}") -> Path:
    """A matrix as colours with its values written in (confusion matrices, layer weights per label)."""
    figure = Figure(figsize=(max(4.5, 0.55 * len(columns) + 2.5), max(3, 0.45 * len(rows) + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", aspect="auto")
    figure.colorbar(image, ax=axes)
    crowded = sum(map(len, columns)) > 30  # long names (labels) slant; layer numbers stay upright
    axes.set_xticks(range(len(columns)), list(columns), rotation=45 if crowded else 0,
                    ha="right" if crowded else "center")
    axes.set_yticks(range(len(rows)), list(rows))
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if matrix.size <= 400:
        middle = (np.nanmax(matrix) + np.nanmin(matrix)) / 2 if matrix.size else 0
        for (row, column), value in np.ndenumerate(matrix):
            axes.text(column, row, value_format.format(value), ha="center", va="center", fontsize=7,
                      color="white" if value > middle else "black")
    return _save(figure, path)


def layer_weights_bars(weights: dict[int, float], path: Path, title: str) -> Path:
    """A scalar mix's softmax weight per layer."""
    layers = sorted(weights)
    figure = Figure(figsize=(6, 3.2))
    axes = figure.add_subplot()
    axes.bar(range(len(layers)), [weights[layer] for layer in layers])
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set(xlabel="layer", ylabel="weight", title=title)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)
