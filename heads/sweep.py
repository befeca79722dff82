"""Layer sweeps: one probe per stored layer, trained together in one pass over the store (each with its own
random stream, as in any multi-head run) and scored on the eval store.

The trainer runs a short sweep to choose the layer of a probe that names none: which layer carries a task
best differs between tasks and encoders (the last layer is rarely it), and one short pass finds it for the
cost of a few probe epochs.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from typing import Any

from .trainer import TrainConfig, Trainer

# Steps each probe of a layer-choosing sweep trains for (one epoch on smaller stores): enough to rank the
# layers as full training does (BENCHMARKS.md, "Defaults").
CHOICE_SWEEP_STEPS = 500


def sweep_layers(config: TrainConfig, spec: dict[str, Any], layers: list[int],
                 max_steps: int | None = CHOICE_SWEEP_STEPS) -> dict[int, float]:
    """The eval store's primary metric of a probe like `spec` on each of `layers`, trained for one epoch (at
    most `max_steps` steps) with `config`'s store, batch size, seed and learning rate."""
    if config.eval_store is None:
        raise ValueError("a layer sweep needs an eval store")
    probes = [{**spec, "name": f"layer_{layer}", "layers": [layer]} for layer in layers]
    with tempfile.TemporaryDirectory(prefix="heads-sweep-") as scratch:
        summary = Trainer(replace(config, heads=probes, out=scratch, epochs=1, patience=None, resume=False,
                                  progress=False), max_steps_per_epoch=max_steps).train()
    return {layer: summary[f"layer_{layer}"]["best"] for layer in layers}
