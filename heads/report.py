"""`heads report`: what a trained head learned, as one self-contained HTML page (figures embedded) plus the
PNG figures and the numbers (report.json) beside it.

From the training log (metrics.jsonl): learning curves. On an eval store (the one given, else the one the
head was trained with): the metrics, precision/recall/F1 per label (entity type for tagging) and a confusion
matrix. For an adapter: its layer-attention weights, averaged per gold label (which layers it reads for what);
for a scalar mix: its layer weights. A multi-head run's directory gives one page comparing its heads.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore import Store, open_store
from featstore.errors import ConfigError

from . import figures
from .batches import collated_batches, head_inputs, label_map, remap_labels
from .head import CONFIG_NAME, Head
from .trainer import METRICS_NAME, evaluate_heads

logger = logging.getLogger(__name__)

REPORT_NAME, REPORT_JSON = "index.html", "report.json"


@dataclass
class HeadSection:
    """One head's part of the report: its numbers and the figures drawn for it."""

    name: str
    head: Head
    metrics: dict[str, Any] = field(default_factory=dict)
    per_label: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_weights: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)  # caption -> PNG


def find_heads(directory: Path) -> tuple[list[Path], Path | None]:
    """The saved heads in `directory` (a head, or a multi-head run holding one per subdirectory) and the
    training log that covers them, if there is one."""
    if (directory / CONFIG_NAME).is_file():
        heads = [directory]
        logs = [directory / METRICS_NAME, directory.parent / METRICS_NAME]
    else:
        heads = sorted(path.parent for path in directory.glob(f"*/{CONFIG_NAME}"))
        logs = [directory / METRICS_NAME]
    if not heads:
        raise ConfigError(f"{directory} holds no saved head (a directory with {CONFIG_NAME}), nor a multi-head run "
                          "of them")
    return heads, next((log for log in logs if log.is_file()), None)


def _read_log(path: Path | None, names: set[str]) -> list[dict[str, Any]]:
    if path is None:
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("head") in names]


def per_label_metrics(confusion: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of each label from a confusion matrix (rows gold, columns predicted)."""
    result = {}
    for index, name in enumerate(names):
        true_positives = confusion[index, index]
        predicted, support = confusion[:, index].sum(), confusion[index].sum()
        precision = true_positives / predicted if predicted else 0.0
        recall = true_positives / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                        "support": int(support)}
    return result


def confusion_matrix(gold: dict[int, Any], predicted: dict[int, Any], num_labels: int) -> np.ndarray:
    """Counts of (gold label, predicted label) over every word (tagging) or sequence (classification)."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for row, expected in gold.items():
        pairs = zip(expected, predicted[row]) if isinstance(expected, list) else [(expected, predicted[row])]
        for gold_label, predicted_label in pairs:
            matrix[gold_label, predicted_label] += 1
    return matrix


@torch.no_grad()
def layer_attention_by_label(head: Head, store: Store, batch_size: int = 64) -> np.ndarray:
    """An adapter's layer-attention weight per layer, averaged over the tokens of each gold label (tagging: a
    word's tokens carry its label; classification: every token its sequence's label): (labels, layers)."""
    num_labels = len(head.config.label_names or ())
    sums, counts = np.zeros((num_labels, len(head.config.layers))), np.zeros(num_labels)
    mapping = label_map(head.config.label_names, store)
    task = head.config.task_def
    head.eval()
    for batch in collated_batches(store.iter_epoch(layers=head.config.layers, shuffle=False), batch_size):
        labels = remap_labels(batch["labels"], mapping).numpy()
        hidden, mask, word_ids, layout = head_inputs(batch, slice(None))  # the layout the batch carries
        head(hidden, mask, word_ids, task.num_words(batch["labels"]), layout)
        weights = head.mixer.aggregator.last_weights.numpy()  # (B, T, L)
        if task.per_word:  # each token takes the label of its word
            rows, tokens = np.nonzero(word_ids.numpy() >= 0)
            token_labels = labels[rows, word_ids.numpy()[rows, tokens]]
        else:
            rows, tokens = np.nonzero(mask.numpy())
            token_labels = labels[rows]
        keep = token_labels >= 0
        np.add.at(sums, token_labels[keep], weights[rows[keep], tokens[keep]])
        np.add.at(counts, token_labels[keep], 1)
    return sums / np.maximum(counts, 1)[:, None]


def build_report(head_dir: str | Path, out: str | Path, eval_store: str | None = None, batch_size: int = 64
                 ) -> Path:
    """Write OUT/index.html (self-contained), its PNG figures and report.json; returns the page's path."""
    directory, out = Path(head_dir), Path(out)
    paths, log_path = find_heads(directory)
    loaded = [Head.from_pretrained(path) for path in paths]
    sections = [HeadSection(head.config.name, head) for head in loaded]
    out.mkdir(parents=True, exist_ok=True)
    store_path = eval_store or _recorded_eval_store(sections[0].head)
    primary = sections[0].head.config.task_def.primary_metric
    log = _read_log(log_path, {section.head.config.name for section in sections})
    shared: dict[str, Path] = {}
    if log:
        train = {name: ([r["global_step"] for r in rows], [r["loss"] for r in rows])
                 for name, rows in _by_head(log, "train").items()}
        evaluation = {name: ([r["epoch"] for r in rows], [r[primary] for r in rows])
                      for name, rows in _by_head(log, "eval").items()}
        shared["Learning curves"] = figures.learning_curves(train, evaluation, primary, out / "learning_curves.png")
    if store_path is not None:
        with open_store(store_path) as store:
            _evaluate_sections(sections, store, out, batch_size)
    for section in sections:
        _mixer_figures(section, out)
    summary = _summary(directory, store_path, primary, sections, log_path)
    (out / REPORT_JSON).write_text(json.dumps(summary, indent=2))
    page = out / REPORT_NAME
    page.write_text(_html(summary, shared, sections))
    return page


def _recorded_eval_store(head: Head) -> str | None:
    """The eval store the head was trained with, when it is still there."""
    record = head.training_record
    if record is None or record.eval_store is None:
        return None
    try:
        with open_store(record.eval_store) as store:
            if store.fingerprint == record.eval_store_fingerprint:
                return record.eval_store
    except Exception as error:  # moved or deleted since: the report goes on without it
        logger.info("the recorded eval store %s cannot be opened (%s)", record.eval_store, error)
    return None


def _by_head(log: list[dict[str, Any]], event: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in log:
        if record["event"] == event:
            grouped.setdefault(record["head"], []).append(record)
    return grouped


def _evaluate_sections(sections: list[HeadSection], store: Store, out: Path, batch_size: int) -> None:
    results = evaluate_heads([section.head for section in sections], store, batch_size, return_predictions=True)
    for section, result in zip(sections, results):
        config, slug = section.head.config, _slug(section.name)
        section.metrics = {key: value for key, value in result["metrics"].items() if key != "per_type"}
        if config.label_names is None:  # regression: no labels to break down
            continue
        names = list(config.label_names)
        confusion = confusion_matrix(result["gold"], result["predictions"], len(names))
        # tagging: entity-level scores per type (the task's metric); classification: per class
        section.per_label = result["metrics"].get("per_type") or per_label_metrics(confusion, names)
        section.figures["Precision, recall and F1 per " + ("entity type" if config.task_def.per_word else "label")] = \
            figures.per_label_bars(section.per_label, out / f"{slug}_per_label.png", section.name)
        normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        section.figures["Confusion matrix (rows: gold, share of each gold label)"] = figures.heatmap(
            normalised, names, names, out / f"{slug}_confusion.png", f"{section.name}: confusion", "predicted", "gold")
        if config.head_type == "adapter":
            weights = layer_attention_by_label(section.head, store, batch_size)
            section.layer_weights = {"by_label": {name: dict(zip(config.layers, map(float, row)))
                                                  for name, row in zip(names, weights)}}
            section.figures["Layer-attention weight per gold label (mean over tokens)"] = figures.heatmap(
                weights, names, [str(layer) for layer in config.layers], out / f"{slug}_layer_attention.png",
                f"{section.name}: layer attention", "layer", "gold label")


def _mixer_figures(section: HeadSection, out: Path) -> None:
    """A scalar mix's learned layer weights (they need no store)."""
    config = section.head.config
    if config.head_type != "scalar_mix":
        return
    weights = section.head.mixer.weights.detach().softmax(0).tolist()
    section.layer_weights = {"scalar_mix": dict(zip(config.layers, weights))}
    section.figures["Scalar-mix layer weights"] = figures.layer_weights_bars(
        section.layer_weights["scalar_mix"], out / f"{_slug(section.name)}_scalar_mix.png", section.name)


def _summary(directory: Path, store: str | None, primary: str, sections: list[HeadSection],
             log_path: Path | None) -> dict[str, Any]:
    heads = []
    for section in sections:
        config, record = section.head.config, section.head.training_record
        heads.append({"name": section.name, "type": config.head_type, "layers": config.layers,
                      "saved_epoch": record.epoch if record else None, "metrics": section.metrics,
                      "per_label": section.per_label, "layer_weights": section.layer_weights,
                      "figures": {caption: path.name for caption, path in section.figures.items()}})
    return {"head_dir": str(directory), "eval_store": store, "primary_metric": primary,
            "log": str(log_path) if log_path else None, "heads": heads}


def _slug(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "_" for char in name)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:1em}
img{max-width:100%}figcaption{font-size:0.9em;color:#555}.note{color:#666}"""


def _html(summary: dict[str, Any], shared: dict[str, Path], sections: list[HeadSection]) -> str:
    primary = summary["primary_metric"]
    parts = [f"<h1>Head report: {html.escape(summary['head_dir'])}</h1>"]
    store = summary["eval_store"]
    parts.append(f"<p>Evaluated on <code>{html.escape(store)}</code>.</p>" if store else
                 '<p class="note">No eval store (give --store): metrics, per-label scores and attention weights '
                 "need one.</p>")
    metric_names = sorted({key for head in summary["heads"] for key, value in head["metrics"].items()
                           if isinstance(value, float)}, key=lambda key: (key != primary, key))
    if metric_names:
        parts.append("<h2>Heads compared</h2>" if len(sections) > 1 else "<h2>Metrics</h2>")
        parts.append(_table(["head", "type", "layers", "saved epoch", *metric_names],
                            [[head["name"], head["type"], ",".join(map(str, head["layers"])),
                              head["saved_epoch"], *(head["metrics"].get(key, "") for key in metric_names)]
                             for head in summary["heads"]]))
    parts += [_image(path, caption) for caption, path in shared.items()]
    if summary["log"] is None:
        parts.append('<p class="note">No training log (metrics.jsonl) beside the head: no learning curves.</p>')
    for section, head in zip(sections, summary["heads"]):
        parts.append(f"<h2>{html.escape(section.name)} ({html.escape(head['type'])})</h2>")
        if section.per_label:
            parts.append(_table(["label", "precision", "recall", "f1", "support"],
                                [[name, row["precision"], row["recall"], row["f1"], row["support"]]
                                 for name, row in sorted(section.per_label.items())]))
        parts += [_image(path, caption) for caption, path in section.figures.items()]
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Head report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
