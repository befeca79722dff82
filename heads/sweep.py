"""Layer sweeps: one probe per stored layer, trained together in one pass over the store (each with its own
random stream, as in any multi-head run) and scored on the eval store.

- `probe_sweep` (`heads sweep`): every probe trained in full, saved, and the classic probing curve (the eval
  metric per layer) drawn, with the table as CSV and JSON.
- `sweep_layers`: the trainer's short sweep to choose the layer of a probe that names none: which layer
  carries a task best differs between tasks and encoders (the last layer is rarely it), and one short pass
  finds it for the cost of a few probe epochs.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from featstore import open_store
from featstore.errors import ConfigError

from .config import is_probe
from .trainer import TrainConfig, Trainer, head_type_of

# Steps each probe of a layer-choosing sweep trains for (one epoch on smaller stores): enough to rank the
# layers as full training does (BENCHMARKS.md, "Defaults").
CHOICE_SWEEP_STEPS = 500
SWEEP_JSON, SWEEP_CSV, SWEEP_FIGURE = "sweep.json", "sweep.csv", "sweep.png"


def _probe_name(layer: int) -> str:
    return f"layer_{layer}"


def sweep_layers(config: TrainConfig, spec: dict[str, Any], layers: list[int],
                 max_steps: int | None = CHOICE_SWEEP_STEPS) -> dict[int, float]:
    """The eval store's primary metric of a probe like `spec` on each of `layers`, trained for one epoch (at
    most `max_steps` steps) with `config`'s store, batch size, seed and learning rate."""
    if config.eval_store is None:
        raise ValueError("a layer sweep needs an eval store")
    probes = [{**spec, "name": _probe_name(layer), "layers": [layer]} for layer in layers]
    with tempfile.TemporaryDirectory(prefix="heads-sweep-") as scratch:
        summary = Trainer(replace(config, heads=probes, out=scratch, epochs=1, patience=None, resume=False,
                                  progress=False, report_to="none"), max_steps_per_epoch=max_steps).train()
    return {layer: summary[_probe_name(layer)]["best"] for layer in layers}


def probe_sweep(config: TrainConfig) -> dict[str, Any]:
    """`heads sweep`: one probe like `config`'s single head spec on every stored layer, trained together in one
    pass per epoch with `config`'s settings (early stopping per probe on the eval store), each saved in
    OUT/layer_K; OUT gets the table (sweep.json, sweep.csv) and the probing curve (sweep.png)."""
    if config.eval_store is None:
        raise ConfigError("heads sweep scores every layer on an eval store: give --eval-store")
    if len(config.heads) != 1 or not is_probe(head_type_of(config.heads[0])):
        raise ConfigError(f"heads sweep trains one probe type per layer; got heads {config.heads}")
    spec = config.heads[0]
    with open_store(config.store) as store:
        layers = store.layers
    probes = [{**spec, "name": _probe_name(layer), "layers": [layer]} for layer in layers]
    trainer = Trainer(replace(config, heads=probes))
    summary = trainer.train()
    metric = trainer.runs[0].head.config.task_def.primary_metric
    rows = [{"layer": layer, metric: summary[_probe_name(layer)]["best"],
             "epoch": summary[_probe_name(layer)]["saved_epoch"], "head": summary[_probe_name(layer)]["dir"]}
            for layer in layers]
    best = max(rows, key=lambda row: row[metric])
    head_type = head_type_of(spec)
    table = {"head_type": head_type, "metric": metric, "store": config.store, "eval_store": config.eval_store,
             "best_layer": best["layer"], "best": best[metric], "layers": rows}
    out = Path(config.out)
    (out / SWEEP_JSON).write_text(json.dumps(table, indent=2))
    with (out / SWEEP_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from .figures import probing_curve  # matplotlib only when a figure is drawn

    probing_curve({head_type: {row["layer"]: row[metric] for row in rows}}, metric, out / SWEEP_FIGURE,
                  f"{head_type} probe per layer on {Path(config.eval_store).name}")
    return {**table, "files": [str(out / name) for name in (SWEEP_JSON, SWEEP_CSV, SWEEP_FIGURE)]}
