"""The measurements behind `heads train`'s defaults (not a test): figures for BENCHMARKS.md "Defaults".

Two corpora, both scored with entity/chunk span F1 (seqeval):
- conll-ner: CoNLL-2003 NER (news; 14,041 training sentences; 4 entity types).
- chunk-3k: CoNLL-2003's syntactic chunk column (a different task: 11 phrase types, nearly every word in a
  span) on a random 3,000-sentence training sample: the size of a small in-house or tweet corpus, where a
  fixed 10 epochs is only ~940 optimiser steps.

Phases (each writes its figures to the JSON file as it goes):
- `lr`: a learning-rate grid per head type (one pass over the store trains every grid point together; each
  head keeps its own RNG stream, so this equals separate runs), dev F1 of the best epoch.
- `layers`: the quick one-epoch sweep the trainer runs when a probe names no layer (dev F1 per layer, choice,
  time), to set against full training of a linear probe per layer (the `lr` phase trains those).
- `defaults`: `heads train --head TYPE --eval-store DEV` for every head type, with the defaults of v0.2
  (lr 1e-3, the last layer for probes, 10 epochs, no final anneal) and with today's, same seeds; test F1.
- `grouping`: today's defaults with batches as shuffled (length grouping was the default when the `defaults`
  phase's "after" runs of 2026-11-24 ran), same seeds: what length grouping alone changes.
- `adapter_epochs`: the adapter with today's defaults but 10 epochs, same seeds.

    HF_HUB_OFFLINE=1 python tools/bench_defaults.py --data ../shared/data/conll2003 --workdir /tmp/bench-defaults \
        --json benchmarks/defaults-2026-11-23.json
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchargs import Recorder, conll2003_parser, conll2003_setup, train_and_test

from featstore import ExtractConfig, extract
from featstore.extraction.corpus import CorpusSpec
from heads import TrainConfig, Trainer
from heads.config import HEAD_TYPES
from heads.sweep import sweep_layers

CORPORA: dict[str, dict[str, Any]] = {  # name -> CoNLL tag column and training sample size (None: all)
    "conll-ner": {"tag_column": 3, "train_sentences": None},
    "chunk-3k": {"tag_column": 2, "train_sentences": 3000},
}
# (learning rates, probe layers) per head type. The small corpus gets the wide grid, one training pass per head
# type; CoNLL-2003 (4.7x the steps per epoch) a narrower grid around the small corpus's optimum, in one pass.
LR_GRID = {
    "chunk-3k": {"adapter": ([3e-4, 1e-3, 3e-3], [None]), "linear": ([1e-3, 3e-3, 1e-2, 3e-2], range(7)),
                 "scalar_mix": ([1e-3, 3e-3, 1e-2, 3e-2], [None]), "mlp": ([3e-4, 1e-3, 3e-3, 1e-2], [3, 6]),
                 "fusion": ([3e-4, 1e-3, 3e-3, 1e-2], [None])},
    "conll-ner": {"linear": ([3e-3, 1e-2, 3e-2], [3, 4, 6]), "mlp": ([1e-3, 3e-3, 1e-2], [4]),
                  "scalar_mix": ([3e-3, 1e-2, 3e-2], [None]), "fusion": ([1e-3, 3e-3, 1e-2], [None])},
}
LR_ONE_PASS = ("conll-ner",)
# v0.2: one lr for every head, probes on the last layer, 10 epochs, stopped at once when out of patience, batches
# as they come from the shuffled stream
V02_DEFAULTS = {"lr": 1e-3, "epochs": 10, "final_anneal": False, "group_by_length": False}
# the head types v0.2 had (the defaults phase compares them; the sequence and tail heads came later)
V02_HEAD_TYPES = ["adapter", "linear", "scalar_mix", "mlp", "fusion"]


def _sentences(path: Path) -> list[str]:
    return [block for block in path.read_text().split("\n\n") if block.strip()]


def prepare(data: Path, workdir: Path, record: Recorder) -> dict[str, dict[str, str]]:
    """Every corpus's train/dev/test stores (extracted once, reused on later runs)."""
    stores: dict[str, dict[str, str]] = {}
    for corpus, settings in CORPORA.items():
        stores[corpus] = {}
        # every tag of the column in any split: a sample of train may lack a rare one that dev has
        labels = sorted({line.split()[settings["tag_column"]] for split in ("train", "dev", "test")
                         for line in (data / f"{split}.txt").read_text().splitlines() if line.strip()})
        for split in ("train", "dev", "test"):
            source = data / f"{split}.txt"
            if split == "train" and settings["train_sentences"]:
                sample = random.Random(0).sample(_sentences(source), settings["train_sentences"])
                source = workdir / f"{corpus}-train.txt"
                source.write_text("\n\n".join(sample) + "\n")
            started = time.perf_counter()
            result = extract(ExtractConfig(out=str(workdir / f"{corpus}-{split}.zarr"), progress=False,
                                           corpus=CorpusSpec(str(source), format="conll",
                                                             conll_tag_column=settings["tag_column"],
                                                             label_names=labels)))
            if not result.already_complete:
                record[f"{corpus}_extract_{split}_seconds"] = round(time.perf_counter() - started, 1)
            stores[corpus][split] = result.path
    return stores


def lr_phase(stores: dict[str, dict[str, str]], workdir: Path, record: Recorder, seed: int,
             corpora: list[str]) -> None:
    """Dev F1 (best epoch, 10 epochs, no early stopping) and test F1 of every grid point."""
    for corpus in corpora:
        corpus_stores = stores[corpus]
        grid = LR_GRID[corpus]
        passes = {"all": list(grid)} if corpus in LR_ONE_PASS else {head_type: [head_type] for head_type in grid}
        for name, head_types in passes.items():
            key = f"lr_{corpus}_{name}_seed{seed}"
            if key in record.results:
                continue
            heads = [{"type": head_type, "lr": lr, "layers": None if layer is None else [layer],
                      "name": f"{head_type}_lr{lr:g}" + ("" if layer is None else f"_L{layer}")}
                     for head_type in head_types for lr in grid[head_type][0] for layer in grid[head_type][1]]
            started = time.perf_counter()
            summary = train_and_test(corpus_stores, workdir / key, heads, seed=seed, patience=None, epochs=10)
            record[key] = {name: {"dev_f1": result["best"], "best_epoch": result["saved_epoch"],
                                  "test_f1": result["test_f1"]} for name, result in summary.items()}
            record[f"{key}_seconds"] = round(time.perf_counter() - started, 1)


def layers_phase(stores: dict[str, dict[str, str]], workdir: Path, record: Recorder, seed: int,
                 corpora: list[str]) -> None:
    """The quick sweep's dev F1 per layer (what the trainer ranks layers by) and its time, per probe type."""
    for corpus in corpora:
        corpus_stores = stores[corpus]
        for head_type in ("linear", "mlp"):
            key = f"sweep_{corpus}_{head_type}_seed{seed}"
            if key in record.results:
                continue
            config = TrainConfig(store=corpus_stores["train"], eval_store=corpus_stores["dev"], out=str(workdir),
                                 seed=seed, progress=False)
            started = time.perf_counter()
            scores = sweep_layers(config, {"type": head_type}, list(range(7)))
            record[key] = {"dev_f1": {layer: round(100 * f1, 2) for layer, f1 in scores.items()},
                           "chosen": max(scores, key=scores.__getitem__),
                           "seconds": round(time.perf_counter() - started, 1)}


def _head_specs(settings: str, head_types: list[str]) -> list[dict[str, Any]]:
    """Each head type as `heads train --head TYPE` makes it: with v0.2's defaults or today's."""
    if settings == "after":
        return [{"type": head_type, "name": head_type} for head_type in head_types]
    return [{"type": head_type, "name": head_type, "lr": V02_DEFAULTS["lr"],
             **({"layers": [-1]} if HEAD_TYPES[head_type].single_layer else {})} for head_type in head_types]


def defaults_phase(stores: dict[str, dict[str, str]], workdir: Path, record: Recorder, seeds: list[int],
                   head_types: list[str], corpora: list[str]) -> None:
    """Test F1 of each head type trained with `heads train --head TYPE --eval-store DEV` and nothing else, under
    v0.2's defaults and today's, same seeds (today's final anneal makes every head's settings differ)."""
    for corpus in corpora:
        corpus_stores = stores[corpus]
        for seed in seeds:
            before_key, after_key = f"defaults_{corpus}_before_seed{seed}", f"defaults_{corpus}_after_seed{seed}"
            if before_key not in record.results:
                summary = train_and_test(corpus_stores, workdir / before_key, _head_specs("before", head_types),
                                         seed=seed, epochs=V02_DEFAULTS["epochs"],
                                         final_anneal=V02_DEFAULTS["final_anneal"],
                                         group_by_length=V02_DEFAULTS["group_by_length"])
                record[before_key] = {name: {"test_f1": result["test_f1"], "layers": result["layers"],
                                             "saved_epoch": result["saved_epoch"], "lr": V02_DEFAULTS["lr"],
                                             "epochs": V02_DEFAULTS["epochs"]} for name, result in summary.items()}
            if after_key in record.results:
                continue
            config = TrainConfig(store=corpus_stores["train"], eval_store=corpus_stores["dev"], out=str(workdir),
                                 heads=[{"type": "adapter"}], seed=seed, progress=False)
            epochs = Trainer(config).epochs
            summary = train_and_test(corpus_stores, workdir / after_key, _head_specs("after", head_types), seed=seed)
            record[after_key] = {
                head_type: {"test_f1": summary[head_type]["test_f1"], "layers": summary[head_type]["layers"],
                            "saved_epoch": summary[head_type]["saved_epoch"], "lr": HEAD_TYPES[head_type].lr,
                            "epochs": epochs} for head_type in head_types}


def grouping_phase(stores: dict[str, dict[str, str]], workdir: Path, record: Recorder, seeds: list[int],
                   head_types: list[str], corpora: list[str]) -> None:
    """Test F1 of each head type with today's defaults but batches as they come from the shuffled stream (no
    length grouping), same seeds as the `defaults` phase's "after" runs: what grouping alone changes."""
    for corpus in corpora:
        for seed in seeds:
            key = f"grouping_{corpus}_ungrouped_seed{seed}"
            if key not in record.results:
                summary = train_and_test(stores[corpus], workdir / key, _head_specs("after", head_types), seed=seed,
                                         group_by_length=False)
                record[key] = {name: {"test_f1": result["test_f1"], "saved_epoch": result["saved_epoch"]}
                               for name, result in summary.items()}


def adapter_epochs_phase(stores: dict[str, dict[str, str]], workdir: Path, record: Recorder, seeds: list[int],
                         corpora: list[str]) -> None:
    """Test F1 of the adapter with today's defaults but the paper's 10 epochs instead of the store-size rule (which
    stretches a small store's schedule to 3,000 steps), same seeds as the `defaults` phase."""
    for corpus in corpora:
        for seed in seeds:
            key = f"adapter_epochs10_{corpus}_seed{seed}"
            if key not in record.results:
                summary = train_and_test(stores[corpus], workdir / key, _head_specs("after", ["adapter"]), seed=seed,
                                         epochs=10)
                record[key] = {"test_f1": summary["adapter"]["test_f1"],
                               "saved_epoch": summary["adapter"]["saved_epoch"]}


def print_tables(results: dict[str, Any], seeds: list[int]) -> None:
    """Markdown tables: the learning-rate grid (dev F1 of the best epoch; probes: their best layer) and the
    defaults phase (test F1 per head type, mean and range over seeds)."""
    for key, grid in sorted(results.items()):
        if key.startswith("lr_") and not key.endswith("_seconds"):
            print(f"\n{key}: " + "; ".join(f"{name} {row['dev_f1']}" for name, row in grid.items()))
    for corpus in reversed(CORPORA):
        print(f"\n{corpus}\n\n| head | v0.2 defaults | today's defaults | today: lr, epochs, layer |")
        print("|---|---|---|---|")
        for head_type in HEAD_TYPES:
            cells, settings = [], ""
            for when in ("before", "after"):
                rows = [results.get(f"defaults_{corpus}_{when}_seed{seed}", {}).get(head_type) for seed in seeds]
                scores = [row["test_f1"] for row in rows if row]
                cells.append(f"{np.mean(scores):.2f} ({min(scores):.2f}-{max(scores):.2f})" if scores else "-")
                if when == "after" and rows and rows[0]:
                    layers = {tuple(row["layers"]) for row in rows if row and HEAD_TYPES[head_type].single_layer}
                    settings = f"{rows[0]['lr']:g}, {rows[0]['epochs']}" + (f", {sorted(layers)}" if layers else "")
            if cells != ["-", "-"]:
                print(f"| {head_type} | {cells[0]} | {cells[1]} | {settings} |")


def main() -> None:
    parser = conll2003_parser(__doc__, "bench-defaults", ["extract", "lr", "layers", "defaults", "grouping",
                                                                 "adapter_epochs", "tables"],
                              ["lr", "layers", "defaults"])
    parser.add_argument("--head-types", nargs="*", default=V02_HEAD_TYPES, choices=list(HEAD_TYPES),
                        help="head types of the defaults phase")
    parser.add_argument("--corpora", nargs="*", default=list(reversed(CORPORA)), choices=list(CORPORA),
                        help="corpora of every phase (the small one first: quick answers)")
    args = parser.parse_args()
    data, workdir, record = conll2003_setup(args)
    stores = prepare(data, workdir, record)
    if "lr" in args.phases:
        lr_phase(stores, workdir, record, seed=args.seeds[0], corpora=args.corpora)
    if "layers" in args.phases:
        layers_phase(stores, workdir, record, seed=args.seeds[0], corpora=args.corpora)
    if "defaults" in args.phases:
        defaults_phase(stores, workdir, record, args.seeds, args.head_types, args.corpora)
    if "grouping" in args.phases:
        grouping_phase(stores, workdir, record, args.seeds, args.head_types, args.corpora)
    if "adapter_epochs" in args.phases:
        adapter_epochs_phase(stores, workdir, record, args.seeds, args.corpora)
    if "tables" in args.phases:
        print_tables(record.results, args.seeds)


if __name__ == "__main__":
    main()
