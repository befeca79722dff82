"""What a saved head says about itself: how it was trained (`TrainingRecord`, config.json's "training" section)
and its model card (README.md beside the weights, as on the Hugging Face Hub), written from the same facts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HeadConfig

CARD_NAME = "README.md"


@dataclass
class TrainingRecord:
    """The stores a head was trained and evaluated on (by content fingerprint, and where they were), the
    recipe, and the eval store's metrics at the saved epoch. A catalog's lineage is read from it."""

    train_store: str | None = None
    train_store_fingerprint: str | None = None
    eval_store: str | None = None
    eval_store_fingerprint: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # lr, epochs, batch size, seed, ...
    epoch: int | None = None  # the epoch whose weights were saved
    metrics: dict[str, Any] = field(default_factory=dict)  # on the eval store at that epoch (none without one)
    saved_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingRecord:
        """Tolerates unknown keys (written by a later version)."""
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def render_model_card(config: HeadConfig, training: TrainingRecord | None, weights_sha256: str) -> str:
    """A Hub-style model card: YAML front matter, then what the head does, what it was trained on and how,
    how it scored, and how to load it and predict."""
    task = config.task_def
    primary = training.metrics.get(task.primary_metric) if training else None
    front = ["---", "library_name: featstore", f"tags: [featstore, frozen-encoder, {config.head_type}, {config.task}]"]
    if config.encoder.name_or_path:
        front.append(f"base_model: {json.dumps(config.encoder.name_or_path)}")
    if primary is not None:
        front.append(f"metrics: [{task.primary_metric}]")
    front.append("---")
    labels = ", ".join(f"`{name}`" for name in config.label_names) if config.label_names else "none (regression)"
    lines = [
        *front, "", f"# {config.name}", "",
        f"A `{config.head_type}` head for **{config.task}**, trained with featstore on cached hidden states of the "
        "frozen encoder below (the encoder itself was never trained).", "",
        "| | |", "|---|---|",
        f"| task | {config.task} |", f"| head type | {config.head_type} |",
        f"| encoder layers read | {', '.join(map(str, config.layers))} |", f"| labels | {labels} |",
        f"| encoder | `{config.encoder.name_or_path}` |",
        f"| encoder weights sha256 | `{config.encoder.weights_sha256}` |",
        f"| tokenizer sha256 | `{config.encoder.tokenizer_sha256}` |",
        f"| extraction | max_length {config.extraction.max_length}, stride {config.extraction.stride}, stored as "
        f"{config.extraction.storage_dtype} |",
        f"| training store fingerprint | `{config.store_fingerprint}` |",
        f"| head weights sha256 | `{weights_sha256}` |",
    ]
    if training is not None:
        lines += ["", "## Training", "",
                  f"Trained from `{training.train_store}`"
                  + (f", evaluated on `{training.eval_store}` (fingerprint `{training.eval_store_fingerprint}`)"
                     if training.eval_store else " (no eval store: the last epoch was saved)")
                  + f"; saved at epoch {training.epoch}, {training.saved_at}.", "",
                  "| setting | value |", "|---|---|",
                  *(f"| {key} | {value} |" for key, value in training.recipe.items())]
        if training.metrics:
            lines += ["", "## Evaluation", "", f"On the eval store at the saved epoch (primary metric: "
                      f"{task.primary_metric}).", "", "| metric | value |", "|---|---|",
                      *(f"| {key} | {value:.4f} |" for key, value in training.metrics.items()
                        if isinstance(value, float))]
            per_type = training.metrics.get("per_type")
            if per_type:
                lines += ["", "| type | precision | recall | f1 | support |", "|---|---|---|---|---|",
                          *(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                            f"{row['support']} |" for name, row in sorted(per_type.items()))]
    lines += ["", "## Use", "", "```bash",
              "heads predict --head HEAD_DIR --input sentences.txt     # the live encoder, then this head",
              "heads evaluate --head HEAD_DIR --store labeled.zarr     # a store of the same encoder", "```", "",
              "```python", "from heads import Head, Predictor", "", 'head = Head.from_pretrained("HEAD_DIR")',
              'records = Predictor("HEAD_DIR").predict(["raw text", ["pre", "split", "words"]])', "```", "",
              "A store or encoder whose weights differ from the ones above is refused.", ""]
    return "\n".join(lines)
