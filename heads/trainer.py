"""Train heads from stores only — the encoder is never loaded.

Many heads in one pass: each batch is read from the store once and feeds every head. Each
head keeps its own torch RNG stream (init and dropout), so training K heads together gives
exactly the weights of K separate runs with the same seeds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from featstore import Store, install_hint, open_store
from featstore.errors import ConfigError, TrainingError
from featstore.options import check_values, from_flat, option, read_options_file
from featstore.store.dataset import LABEL_PADDING
from featstore.store.reader import compact_columns

from .batches import (
    POOL_BATCHES,
    collated_batches,
    head_inputs,
    label_map,
    on_device,
    remap_labels,
    training_batches,
)
from .card import TrainingRecord
from .config import (
    HEAD_TYPES,
    EncoderIdentity,
    ExtractionIdentity,
    HeadConfig,
    default_lr,
    default_probe_layer,
    is_probe,
)
from .grouped import HeadGroup, group_by_key, step_optimizers
from .head import Head, check_store
from .layers import training_precision
from .packing import Layout
from .tail import load_encoder_model, tail_architecture, tail_start_layer
from .tracking import TRACKERS, Tracker, make_tracker

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
TRAINING_KEYS = ("lr", "weight_decay", "seed")
# Options a resumed run may change: they do not affect the heads
RESUME_FREE = ("resume", "progress", "report_to", "catalog", "keep_in_memory")
# Epochs when none are given: enough optimiser steps for a small store to converge (BENCHMARKS.md, "Defaults")
DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, MAX_DEFAULT_EPOCHS = 10, 3000, 50
LR_BY_TYPE = ", ".join(f"{name} {kind.lr:g}" + (f" (LoRA {kind.lora_lr:g})" if kind.lora_lr else "")
                       for name, kind in HEAD_TYPES.items())
PRECISIONS = ("auto", "float32", "bfloat16")
SWITCH = ("auto", "always", "never")  # choices of the options whose "auto" the trainer decides
# --keep-in-memory auto keeps the stores when they fit in this share of the available memory: the rest is for the
# trainer's batches, the heads and whatever else runs
KEEP_SHARE = 0.5
EPOCHS_BY_TYPE = ", ".join(f"{name} heads {kind.epochs}" for name, kind in HEAD_TYPES.items() if kind.epochs)
BATCHED_ON_CPU = ", ".join(f"{name} heads" for name, kind in HEAD_TYPES.items() if kind.batched_on_cpu)


def training_dtype(precision: str, device: str, compiled: bool = False) -> torch.dtype | None:
    """The dtype of a head's forward pass (heads.layers.training_precision: on a GPU whatever autocast casts, on a CPU
    the wide linear maps alone); None: plain float32. `auto` takes bfloat16 on a CUDA device that supports it and on
    a CPU that multiplies it natively (`multiplies_bfloat16`; not for compiled heads, which run float32 there): on a
    2-core AVX512-BF16 CPU the default adapter's training steps ran 1.13x as fast (1.01-1.64x in each of 8
    alternating rounds of epochs), with the same test F1 over 3 seeds (BENCHMARKS.md, "Speed", run 13)."""
    if precision != "auto":
        return torch.bfloat16 if precision == "bfloat16" else None
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if kind == "cpu" and not compiled and multiplies_bfloat16() else None


def multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16), with which a wide
    bfloat16 product ran twice as fast as float32 (BENCHMARKS.md, "Speed", run 13); other CPUs are not known to
    gain from bfloat16, so `auto` keeps float32 there."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # a torch without it cannot tell: no
    return capabilities is not None and any(capabilities().get(name) for name in ("avx512_bf16", "amx_bf16"))


def precision_name(dtype: torch.dtype | None) -> str:
    """The `--precision` a training dtype from `training_dtype` stands for (None: float32)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def keeps_in_memory(keep_in_memory: str, stores_bytes: int, epochs: int) -> bool:
    """Whether the trainer keeps its stores' hidden states in memory (`--keep-in-memory`)."""
    if keep_in_memory != "auto":
        return keep_in_memory == "always"
    return epochs > 1 and stores_bytes <= KEEP_SHARE * available_memory()


def batches_heads(batch_heads: str, device: str, head_type: str, compiled: bool = False) -> bool:
    """Whether heads of `head_type` that can step as one batched module (heads/grouped.py) do: `auto` on a CUDA
    device, where K heads' small kernels become one, and on the CPU for the types whose step is mostly
    per-operation overhead (`HeadType.batched_on_cpu`); never when the heads are compiled (torch.compile runs a
    vmapped forward eagerly; the trainer refuses `always` with compiled heads)."""
    if batch_heads != "auto":
        return batch_heads == "always"
    return not compiled and (torch.device(device).type == "cuda" or HEAD_TYPES[head_type].batched_on_cpu)


def travels_as_stored(device: str) -> bool:
    """Whether batches travel to `device` with float16 features as stored, widened there (on_device): to a GPU,
    half the bytes to pin and copy; on the CPU the collate widens them in the copy it makes anyway."""
    return torch.device(device).type == "cuda"


def default_epochs(steps_per_epoch: int) -> int:
    """10 epochs, or more on a small store so that training takes at least MIN_DEFAULT_STEPS steps."""
    return min(MAX_DEFAULT_EPOCHS, max(DEFAULT_EPOCHS, -(-MIN_DEFAULT_STEPS // max(steps_per_epoch, 1))))


@dataclass
class TrainConfig:
    """A training run; every option is declared once here, and `heads train` derives its flags (help with
    defaults) from it. `heads` lists head specs: {"type": ..., "name": ..., "layers": [...], plus any
    HeadConfig field and per-head "lr", "weight_decay", "seed"}."""

    store: str = option(help="training store (a path or URL)", metavar="STORE")
    out: str = option(help="output directory: the head(s), metrics.jsonl and the resumable checkpoint",
                      metavar="DIR")
    eval_store: str | None = option(None, help="evaluation store: picks the best epoch and stops early",
                                    default_text="none: the last epoch is saved", metavar="STORE")
    heads: list[dict[str, Any]] = option(default_factory=lambda: [{"type": "adapter"}], flag=False,
                                         help="head specs (set with --head or --config)")
    epochs: int | None = option(None, minimum=1, help="passes over the training store",
                                default_text=f"{DEFAULT_EPOCHS}, or as many as make {MIN_DEFAULT_STEPS:,} steps on a "
                                f"small store (at most {MAX_DEFAULT_EPOCHS}); {EPOCHS_BY_TYPE}")
    batch_size: int = option(32, minimum=1, help="sequences per optimiser step")
    group_by_length: bool = option(False, help=f"batch sequences of similar lengths: pools of {POOL_BATCHES} batches "
                                   "from the shuffled stream sorted by length, their batches in random order. Heads "
                                   "compute packed tokens, so this spares only the padding of the bilstm and tail "
                                   "blocks (adapter epochs on CoNLL-2003 are no faster), and the batches are less "
                                   "mixed (0.7 test F1 lower for the adapter there: off by default; BENCHMARKS.md, "
                                   "\"Defaults\")")
    lr: float | None = option(None, minimum=0, help="peak learning rate of the one-cycle schedule (a head spec's "
                              "own 'lr' wins)", default_text=f"by head type: {LR_BY_TYPE}")
    weight_decay: float = option(0.0, minimum=0, help="AdamW weight decay (0: plain Adam, as in the reference "
                                 "recipe)")
    warmup_ratio: float = option(0.1, minimum=0, maximum=1, help="share of the steps spent warming up before "
                                 "the cosine decay")
    seed: int = option(1, help="seed of each head's initialisation, dropout and the shuffling")
    patience: int | None = option(3, minimum=1, help="epochs without improvement on the eval store before a "
                                  "head stops")
    final_anneal: bool = option(True, help="stop a head at once when it stops improving; by default its learning "
                                "rate first falls linearly to zero over --patience more epochs, since early stopping "
                                "otherwise ends a long schedule near its peak")  # the flag is --no-final-anneal
    batch_heads: str = option("auto", choices=SWITCH, help="step heads of one architecture that differ only in "
                              "learning rate, weight decay, seed or the layers they read as one batched module "
                              "(vmap; the same weights as one by one up to float rounding)",
                              default_text="auto: on a CUDA device, where K heads' small kernels become one; on the "
                              f"CPU for {BATCHED_ON_CPU}, whose step is mostly per-operation overhead (a sweep of 7 "
                              "linear probes 1.97x faster batched), not for the other heads, whose batched step "
                              "measured no faster or slower there")
    keep_in_memory: str = option("auto", choices=SWITCH, help="keep the stores' hidden states in memory once read "
                                 "and checked, so that later epochs read nothing (the same batches either way)",
                                 default_text="auto: when training runs more than one epoch and both stores' "
                                 f"layers, decoded, fit in {KEEP_SHARE * 100:.0f}%% of the memory available at the "
                                 "start")
    device: str = option("cpu", help="torch device the heads train on")
    precision: str = option("auto", choices=PRECISIONS, help="the heads' training precision: bfloat16 runs their "
                            "forward passes under autocast on a GPU and their wide linear maps (the adapter's tailor "
                            "feed-forward, an mlp probe's hidden layer) in bfloat16 on a CPU, where narrow products "
                            "run slower in it; losses, optimiser states and saved weights stay float32",
                            default_text="auto: bfloat16 on a CUDA device that supports it and on a CPU with "
                            "bfloat16 instructions (AVX512-BF16, AMX; there the default adapter's training steps ran "
                            "1.13x as fast, with the same F1), unless the heads are compiled; else float32")
    compile: bool = option(False, help="compile each head's forward and backward with torch.compile (inductor, "
                           "dynamic shapes; the first steps of each head compile it). Off by default: on a 2-core CPU "
                           "the default adapter's epoch ran 1.3-1.6x slower compiled (BENCHMARKS.md, \"Speed\"); heads "
                           "then step one by one (a batched group's vmap is not compiled)")
    resume: bool = option(False, help="continue an interrupted run from OUT/trainer_state.pt")
    progress: bool = option(True, help="no progress bars")  # the flag is --no-progress
    log_every: int = option(50, minimum=1, help="steps between loss records in metrics.jsonl")
    catalog: str | None = option(None, help="register the saved heads with this catalog root (their stores and "
                                 "metrics: `heads ls ROOT`, `featstore ls ROOT --heads`; gc keeps their stores)",
                                 metavar="ROOT")
    report_to: str = option("none", choices=TRACKERS, help="also send metrics.jsonl's records to this experiment "
                            f"tracker (an optional extra: {install_hint('tensorboard')}, ...)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "training config") -> TrainConfig:
        """From the flat JSON form (unknown keys refused, naming them); checks bounds and choices."""
        missing = [name for name in ("store", "out") if values.get(name) is None]
        if missing:
            raise ConfigError(f"{where}: give {' and '.join('--' + name for name in missing)}")
        config = from_flat(cls, values, where)
        check_values(config)
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A JSON file of options (with "heads"), `overrides` (flat names, None: not given) applied."""
        given = {key: value for key, value in overrides.items() if value is not None}
        return cls.from_dict({**read_options_file(path, "training config"), **given}, str(path))


@dataclass
class HeadRun:
    """One head being trained: its module, optimiser, schedule, RNG stream and early-stopping state."""

    name: str
    head: Head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    columns: slice | list[int]  # the head's layers within the batch's layers
    rng_state: torch.Tensor
    output_dir: Path
    recipe: dict[str, Any]  # the settings this head trained with, for its TrainingRecord
    best: float = -np.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    anneal_ends: int | None = None  # the epoch after which a head in its final anneal stops
    stopped: bool = False
    finite: torch.Tensor = field(default_factory=lambda: torch.tensor(True))  # every loss so far (on its device)
    cuda_rng_state: torch.Tensor | None = None  # the head's stream on its CUDA device (dropout there draws from it)

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """The head's own random streams around its step (the CPU's, and its CUDA device's when it trains on one),
        so that heads trained together draw exactly what each would draw alone."""
        cuda = [next(self.head.parameters()).device] if self.cuda_rng_state is not None else []
        with torch.random.fork_rng(devices=cuda):  # restores the outer streams afterwards
            torch.set_rng_state(self.rng_state)
            if cuda:
                torch.cuda.set_rng_state(self.cuda_rng_state, cuda[0])
            yield
            self.rng_state = torch.get_rng_state()
            if cuda:
                self.cuda_rng_state = torch.cuda.get_rng_state(cuda[0])


def build_head_config(spec: dict[str, Any], store: Store) -> HeadConfig:
    """A HeadConfig from a spec and the store it will train on (layers default by head type)."""
    head_type = head_type_of(spec)
    spec = {key: value for key, value in spec.items() if key not in (*TRAINING_KEYS, "type", "head_type")}
    layers = spec.pop("layers", None)
    encoder = store.manifest.encoder
    if HEAD_TYPES[head_type].tail:  # its layer follows from its depth; its layers are rebuilt from the config
        tail_architecture(encoder.model_type, encoder.model_class)
        start = tail_start_layer(encoder.num_hidden_states, spec.get("tail_layers", HeadConfig.tail_layers))
        if layers is not None and [encoder.resolve_layer(layer) for layer in layers] != [start]:
            raise ConfigError(f"a tail of {spec.get('tail_layers', HeadConfig.tail_layers)} layer(s) reads stored "
                              f"layer {start}; leave --layers out (or choose --tail-layers)")
        layers, spec["encoder_config"] = [start], {**encoder.config, "model_type": encoder.model_type}
    if layers is None:
        layers = [default_probe_layer(store.layers, encoder.num_hidden_states)] if is_probe(head_type) \
            else store.layers
    layers = sorted(resolved if (resolved := encoder.resolve_layer(layer)) is not None else layer for layer in layers)
    store.layer_columns(layers)  # raises a clear error for layers the store lacks
    try:
        return HeadConfig(head_type=head_type, task=store.task, hidden_size=store.hidden_size, layers=layers,
                          label_names=store.label_names, name=spec.pop("name", head_type),
                          encoder=EncoderIdentity.of(encoder),
                          extraction=ExtractionIdentity.of(store.manifest.extraction),
                          store_fingerprint=store.fingerprint, **spec)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad head spec {spec}: {error}") from None


def head_type_of(spec: dict[str, Any]) -> str:
    return spec.get("type", spec.get("head_type", "adapter"))


def evaluate_heads(heads: Sequence[Head | str | Path], store: Store | str | Path, batch_size: int = 64,
                   device: str = "cpu", return_predictions: bool = False, keep_in_memory: bool = False
                   ) -> list[dict[str, Any]]:
    """Metrics of each head (a Head or a saved head's directory) on a store (open, or a path or URL), in one
    pass over it: [{"head": name, "metrics": {...}}, ...], with "predictions" and "gold" per corpus row (in the
    head's label ids) when asked. `keep_in_memory`: an open store keeps its hidden states in memory for the next
    call (Store.iter_epoch)."""
    loaded = [head if isinstance(head, Head) else Head.from_pretrained(head) for head in heads]
    if isinstance(store, Store):
        return _evaluate(loaded, store, batch_size, device, return_predictions, keep_in_memory)
    with open_store(store) as opened:
        return _evaluate(loaded, opened, batch_size, device, return_predictions)


@torch.no_grad()
def _evaluate(heads: list[Head], store: Store, batch_size: int, device: str, return_predictions: bool,
              keep_in_memory: bool = False) -> list[dict[str, Any]]:
    if not store.labeled:
        raise ConfigError(f"store {store.path} holds no labels; it cannot be used for evaluation")
    for head in heads:
        check_store(head.config, store, f"store {store.path}")
    layers = sorted({layer for head in heads for layer in head.config.layers})
    columns = [_columns(head.config.layers, layers) for head in heads]
    mappings = [label_map(head.config.label_names, store) for head in heads]
    predictions: list[dict[int, Any]] = [{} for _ in heads]
    gold: list[dict[int, Any]] = [{} for _ in heads]  # per head: its own label ids
    for head in heads:
        head.eval()
    # grouped by length (less padding to compute); results are keyed by corpus row, so the order is free
    batches = collated_batches(store.iter_epoch(layers=layers, shuffle=False, keep_in_memory=keep_in_memory),
                               batch_size, group_by_length=True, as_stored=travels_as_stored(device))
    for batch in on_device(batches, device):
        labels = batch["labels"].cpu()
        rows = batch["index"].tolist()
        layout = Layout.of_batch(batch)  # once for all the heads
        for k, head in enumerate(heads):
            task = head.config.task_def
            hidden, mask, word_ids, layout = head_inputs(batch, columns[k], layout)
            output = head(hidden, mask, word_ids, task.num_words(labels), layout)
            decoded = head.decode(output, batch["labels"] != LABEL_PADDING) if task.per_word else None
            output, decoded = output.cpu(), None if decoded is None else decoded.cpu()
            head_labels = remap_labels(labels, mappings[k])
            for row, (gold_row, predicted_row) in zip(rows, task.rows(output, head_labels, decoded)):
                predictions[k][row] = predicted_row
                gold[k][row] = gold_row
    results = []
    for head, predicted, expected in zip(heads, predictions, gold):
        order = sorted(expected)
        metrics = head.config.task_def.metrics([expected[row] for row in order], [predicted[row] for row in order],
                                               head.config.label_names)
        results.append({"head": head.config.name, "metrics": metrics,
                        **({"predictions": predicted, "gold": expected} if return_predictions else {})})
    return results


def training_loss(head: Head, hidden: torch.Tensor, mask: torch.Tensor, word_ids: torch.Tensor | None,
                  labels: torch.Tensor, layout: Layout, training_dtype: torch.dtype | None) -> torch.Tensor:
    """A head's training loss on a batch: its forward pass in `training_dtype` (None: float32; on a CPU only its wide
    linear maps: heads.layers.training_precision), the loss in float32 (a CRF's partition function needs it)."""
    with training_precision(hidden.device.type, training_dtype):
        output = head(hidden, mask, word_ids, head.config.task_def.num_words(labels), layout)
    return head.loss(output.float(), labels)


def _anneal_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The final anneal: from the optimiser's current learning rate linearly to zero in `steps` steps."""
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=max(steps, 1))


def _columns(head_layers: list[int], batch_layers: list[int]) -> slice | list[int]:
    return compact_columns([batch_layers.index(layer) for layer in head_layers])


class Trainer:
    def __init__(self, config: TrainConfig, max_steps_per_epoch: int | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.store = open_store(config.store)
        if not self.store.labeled:
            raise ConfigError(f"store {config.store} holds no labels; extract a labeled corpus to train heads")
        self.eval_store = open_store(config.eval_store) if config.eval_store else None
        if not config.heads:
            raise ConfigError("no heads to train: list at least one head")
        if config.compile and config.precision == "bfloat16" and torch.device(config.device).type == "cpu":
            raise ConfigError("--compile and --precision bfloat16 exclude each other on the CPU: a compiled head "
                              "cannot run its wide linear maps in bfloat16 there; give one of them")
        if config.compile and config.batch_heads == "always":
            raise ConfigError("--compile and --batch-heads always exclude each other: torch.compile does not compile "
                              "a batched group's forward (under vmap it runs eagerly); give one of them")
        # checked before any sweep: names, and every head against both stores (probes at the rule's layer)
        head_configs = [build_head_config(spec, self.store) for spec in config.heads]
        names = [head.name for head in head_configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"head names must be unique, got {names}; give each head a 'name'")
        if self.eval_store is not None:  # checked now, not after the first epoch
            for head in head_configs:
                check_store(head, self.eval_store, f"eval store {config.eval_store}")
        self.steps_per_epoch = min(-(-len(self.store) // config.batch_size), max_steps_per_epoch or math.inf)
        self.epochs = max(self._epochs_of(head.head_type) for head in head_configs)
        self.training_dtype = training_dtype(config.precision, config.device, config.compile)
        saved_state = self._read_state() if config.resume else None
        self.layer_sweeps: dict[int, dict[int, float]] = {}  # head index -> eval metric per layer
        specs = self._with_probe_layers(saved_state)
        head_configs = [build_head_config(spec, self.store) for spec in specs]
        self.layers = sorted({layer for head in head_configs for layer in head.layers})
        self.runs = [self._new_run(spec, head_config) for spec, head_config in zip(specs, head_configs)]
        self.start_epoch = self.epochs_done = 0
        self.tracker = Tracker()  # the configured one while train() runs
        if saved_state is not None:
            self._load_state(saved_state)
        stores_bytes = sum(store.decoded_bytes(self.layers) for store in (self.store, self.eval_store) if store)
        self.keep_in_memory = keeps_in_memory(config.keep_in_memory, stores_bytes, self.epochs - self.start_epoch)
        if self.keep_in_memory:
            logger.info("keeping the stores' hidden states in memory once read (%.2f GB)", stores_bytes / 1e9)

    def _epochs_of(self, head_type: str) -> int:
        """A head's epochs: the ones asked for, else its type's, else the rule for the store's size."""
        return self.config.epochs or HEAD_TYPES[head_type].epochs or default_epochs(self.steps_per_epoch)

    def _with_probe_layers(self, saved_state: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The head specs, with a layer for each probe that names none: the one a quick sweep scores best on
        the eval store (heads.sweep), the rule's layer without an eval store, the saved one on --resume."""
        specs = []
        for index, spec in enumerate(self.config.heads):
            if spec.get("layers") is None and is_probe(head_type_of(spec)):
                saved = saved_state["runs"][index].get("layers") if saved_state is not None else None
                if saved is not None:
                    spec = {**spec, "layers": saved}
                elif self.eval_store is not None:
                    from .sweep import sweep_layers  # the sweep trains probes with this class

                    scores = sweep_layers(self.config, spec, self.store.layers)
                    spec = {**spec, "layers": [max(scores, key=scores.__getitem__)]}
                    self.layer_sweeps[index] = scores
            specs.append(spec)
        return specs

    def _new_run(self, spec: dict[str, Any], head_config: HeadConfig) -> HeadRun:
        seed = spec.get("seed", self.config.seed)
        torch.manual_seed(seed)
        head = Head(head_config)
        if head.tail is not None:
            head.tail.copy_encoder_layers(load_encoder_model(head_config.encoder.name_or_path,
                                                             head_config.encoder.weights_sha256))
        device = torch.device(self.config.device)
        head.to(device)
        if self.config.compile:
            head.compile(dynamic=True)  # in place: the module, its state_dict and saving stay as they are
        lr = spec.get("lr", self.config.lr if self.config.lr is not None else default_lr(head_config))
        trainable = [parameter for parameter in head.parameters() if parameter.requires_grad]  # LoRA freezes some
        # fused: one kernel for all of a head's parameters, 4.6x faster per step than the default on this CPU
        # (BENCHMARKS.md, "Speed"); the same update up to float rounding
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=spec.get("weight_decay", self.config.weight_decay),
                                      fused=True if device.type in ("cpu", "cuda") else None)
        epochs = self._epochs_of(head_config.head_type)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(self.steps_per_epoch * epochs, 1),
            pct_start=self.config.warmup_ratio, anneal_strategy="cos")
        output_dir = self.out if len(self.config.heads) == 1 else self.out / head_config.name
        config = self.config
        recipe = {"lr": lr, "epochs": epochs, "batch_size": config.batch_size, "seed": seed,
                  "weight_decay": spec.get("weight_decay", config.weight_decay), "warmup_ratio": config.warmup_ratio,
                  "patience": config.patience, "final_anneal": config.final_anneal,
                  "precision": precision_name(self.training_dtype)}
        cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # as seeded above
        return HeadRun(head_config.name, head, optimizer, scheduler, _columns(head_config.layers, self.layers),
                       torch.get_rng_state(), output_dir, recipe, finite=torch.tensor(True, device=device),
                       cuda_rng_state=cuda_rng_state)

    # --- the loop -------------------------------------------------------------------------------------
    def train(self) -> dict[str, dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.tracker = make_tracker(self.config.report_to, self.out, asdict(self.config))
        try:
            return self._train()
        finally:
            self.tracker.close()
            self.tracker = Tracker()

    def _train(self) -> dict[str, dict[str, Any]]:
        config = self.config
        if not config.resume:  # a new run starts a new log; a resumed one continues it
            (self.out / METRICS_NAME).unlink(missing_ok=True)
            for index, scores in self.layer_sweeps.items():
                self._log({"event": "layer_sweep", "head": self.runs[index].name, "scores": scores,
                           "chosen": self.runs[index].head.config.layers[0]})
        for epoch in range(self.start_epoch, self.epochs):
            active = [run for run in self.runs if not run.stopped]
            if not active:
                break
            started = time.perf_counter()
            for run in active:
                run.head.train()
            groups = self._groups(active)
            batches = training_batches(self.store, self.layers, config.batch_size, config.seed, epoch,
                                       config.group_by_length, self.keep_in_memory, travels_as_stored(config.device))
            bar = tqdm(on_device(islice(batches, self.steps_per_epoch), config.device),
                       total=self.steps_per_epoch, desc=f"epoch {epoch + 1}", unit="batch", disable=not config.progress)
            for step, batch in enumerate(bar):
                layout = Layout.of_batch(batch)  # once for all the heads
                for runs, group in groups:
                    if group is None:
                        losses = [self._step(runs[0], batch, layout)]
                    else:
                        losses = self._group_step(runs, group, batch, layout)
                    if step % config.log_every == 0:
                        for run, loss in zip(runs, losses):
                            self._check_finite(run)
                            self._log({"event": "train", "head": run.name, "epoch": epoch + 1, "step": step,
                                       "global_step": epoch * self.steps_per_epoch + step, "loss": loss.item(),
                                       "lr": run.optimizer.param_groups[0]["lr"]})
            for run in active:
                self._check_finite(run)  # which also waits for the device: the epoch's time is all its work
            self._end_epoch(epoch, active, time.perf_counter() - started)
        summary = self.summary()
        if config.catalog:
            from .registry import register_heads

            for run, record in zip(self.runs, register_heads([run.output_dir for run in self.runs], config.catalog)):
                summary[run.name]["catalog_record"] = record
        return summary

    def _groups(self, runs: list[HeadRun]) -> list[tuple[list[HeadRun], HeadGroup | None]]:
        """The runs in the groups that step together (heads/grouped.py; None: a run that steps alone), where their
        type batches (`batches_heads`)."""
        config = self.config
        groups = []
        for indices in group_by_key([run.head.config for run in runs]):
            if not batches_heads(config.batch_heads, config.device, runs[indices[0]].head.config.head_type,
                                 config.compile):
                groups.extend(([runs[index]], None) for index in indices)
                continue
            # by the layers they read: a sweep's probes then read adjacent columns, a view of the batch, not a copy
            members = sorted((runs[index] for index in indices), key=lambda run: run.head.config.layers)
            group = HeadGroup([run.head for run in members]) if len(members) > 1 else None
            if group is not None:
                group.train()
            groups.append((members, group))
        return groups

    def _group_step(self, runs: list[HeadRun], group: HeadGroup, batch: dict[str, Any], layout: Layout
                    ) -> list[torch.Tensor]:
        """One optimiser step of each run of a group, their forward and backward passes batched into one."""
        hidden, labels = batch["hidden_states"], batch["labels"]
        columns = [list(range(len(self.layers))[run.columns]) if isinstance(run.columns, slice) else run.columns
                   for run in runs]
        if all(own == columns[0] for own in columns):  # e.g. adapters: every head reads the same layers
            features, heads_dim = hidden[:, runs[0].columns], None
        else:  # e.g. a layer sweep: each head's layers side by side (a view when they follow each other)
            features = hidden[:, compact_columns([column for own in columns for column in own])]
            features, heads_dim = features.unflatten(1, (len(runs), len(columns[0]))), 1
        on_cuda = hidden.device.type == "cuda"
        generators = [torch.Generator(hidden.device).set_state(run.cuda_rng_state if on_cuda else run.rng_state)
                      for run in runs] if group.draws_randomness else []
        losses = group.losses(features, heads_dim, batch["mask"], batch.get("word_ids"),
                              runs[0].head.config.task_def.num_words(labels), layout, labels,
                              generators, self.training_dtype)
        group.zero_grad()
        losses.sum().backward()  # each head's loss reaches only its own weights
        losses = losses.detach()
        step_optimizers([run.optimizer for run in runs])
        for run in runs:
            run.scheduler.step()
        for run, generator in zip(runs, generators):
            if on_cuda:
                run.cuda_rng_state = generator.get_state()
            else:
                run.rng_state = generator.get_state()
        for run, finite in zip(runs, torch.isfinite(losses).unbind()):
            run.finite &= finite
        return list(losses.unbind())

    def _step(self, run: HeadRun, batch: dict[str, Any], layout: Layout) -> torch.Tensor:
        hidden, mask, word_ids, layout = head_inputs(batch, run.columns, layout)
        with run.own_rng():
            loss = training_loss(run.head, hidden, mask, word_ids, batch["labels"], layout, self.training_dtype)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
        run.scheduler.step()
        # Checked at log steps and before any save (_check_finite), not here: reading the loss every step would
        # make the host wait for an accelerator at every step.
        run.finite = run.finite & torch.isfinite(loss.detach())
        return loss.detach()

    @staticmethod
    def _check_finite(run: HeadRun) -> None:
        """Never save (or go on training) a head whose loss went non-finite: say so and stop."""
        if not bool(run.finite):
            raise TrainingError(f"head '{run.name}': the training loss became infinite or NaN; its weights are no "
                                "longer usable. The head saved last (if any) is kept. Check the store (`featstore "
                                "verify`) and lower the learning rate")

    def _end_epoch(self, epoch: int, active: list[HeadRun], seconds: float) -> None:
        self._log({"event": "epoch", "epoch": epoch + 1, "seconds": seconds, "heads": [run.name for run in active]})
        for run in active:  # a head whose type trains fewer epochs than the run stops after its own
            run.stopped = epoch + 1 >= run.recipe["epochs"]
        if self.eval_store is None:
            for run in active:
                run.head.save_pretrained(run.output_dir, self._training_record(run, epoch + 1, {}))
        else:
            results = evaluate_heads([run.head for run in active], self.eval_store, self.config.batch_size * 2,
                                     self.config.device, keep_in_memory=self.keep_in_memory)
            for run, result in zip(active, results):
                metric = result["metrics"][run.head.config.task_def.primary_metric]
                improved = metric > run.best
                if improved:
                    run.best, run.best_epoch, run.bad_epochs = metric, epoch + 1, 0
                    run.head.save_pretrained(run.output_dir, self._training_record(run, epoch + 1, result["metrics"]))
                else:
                    run.bad_epochs += 1
                    if run.anneal_ends is None and self.config.patience is not None \
                            and run.bad_epochs >= self.config.patience:
                        self._stop_or_anneal(run, epoch + 1)
                run.stopped = run.stopped or (run.anneal_ends is not None and epoch + 1 >= run.anneal_ends)
                self._log({"event": "eval", "head": run.name, "epoch": epoch + 1, **result["metrics"],
                           "best": improved, "annealing": run.anneal_ends is not None, "stopped": run.stopped})
        self._save_state(epoch + 1)

    def _training_record(self, run: HeadRun, epoch: int, metrics: dict[str, Any]) -> TrainingRecord:
        evaluated = self.eval_store is not None
        return TrainingRecord(train_store=self.config.store, train_store_fingerprint=self.store.fingerprint,
                              eval_store=self.config.eval_store,
                              eval_store_fingerprint=self.eval_store.fingerprint if evaluated else None,
                              recipe=run.recipe, epoch=epoch, metrics=metrics)

    def _stop_or_anneal(self, run: HeadRun, epochs_done: int) -> None:
        """A head out of patience stops, or (final_anneal) its learning rate falls linearly from where the
        schedule had it to zero over `patience` more epochs (its best epoch is still the one saved)."""
        if not self.config.final_anneal or epochs_done >= run.recipe["epochs"]:
            run.stopped = True
            return
        patience = cast(int, self.config.patience)
        run.anneal_ends = min(epochs_done + patience, run.recipe["epochs"])
        run.scheduler = _anneal_schedule(run.optimizer, (run.anneal_ends - epochs_done) * self.steps_per_epoch)

    # --- logging and resume ---------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with (self.out / METRICS_NAME).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.tracker.log(record)
        if record["event"] == "eval":
            logger.info("epoch %d %s: %s", record["epoch"], record["head"],
                        {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})

    def _save_state(self, epochs_done: int) -> None:
        self.epochs_done = epochs_done
        state = {"epochs_done": epochs_done, "config": asdict(self.config), "runs": [
            {"name": run.name, "head": run.head.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "rng_state": run.rng_state,
             "cuda_rng_state": run.cuda_rng_state, "best": run.best,
             "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs, "stopped": run.stopped,
             "anneal_ends": run.anneal_ends,
             "layers": run.head.config.layers}
            for run in self.runs]}
        temporary = self.out / (STATE_NAME + ".tmp")
        torch.save(state, temporary)
        temporary.replace(self.out / STATE_NAME)  # atomic: a crash never leaves a half-written checkpoint

    def _read_state(self) -> dict[str, Any]:
        """The checkpoint to resume from, refused unless the run that wrote it had the same settings (checked
        before anything in it, such as the probes' chosen layers, is used)."""
        path = self.out / STATE_NAME
        if not path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
        state = torch.load(path, weights_only=False)
        saved = {key: value for key, value in state["config"].items() if key not in RESUME_FREE}
        current = {key: value for key, value in asdict(self.config).items() if key not in RESUME_FREE}
        if saved != current:
            differing = sorted(key for key in current if saved.get(key) != current[key])
            raise ConfigError(f"--resume: {path} was written by a run with different settings ({differing})")
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        for run, saved_run in zip(self.runs, state["runs"]):
            run.head.load_state_dict(saved_run["head"])
            run.optimizer.load_state_dict(saved_run["optimizer"])
            run.anneal_ends = saved_run.get("anneal_ends")
            if run.anneal_ends is not None:
                run.scheduler = _anneal_schedule(run.optimizer, saved_run["scheduler"]["total_iters"])
            run.scheduler.load_state_dict(saved_run["scheduler"])
            run.rng_state = saved_run["rng_state"]
            if run.cuda_rng_state is not None and saved_run.get("cuda_rng_state") is not None:
                run.cuda_rng_state = saved_run["cuda_rng_state"]
            run.best, run.best_epoch = saved_run["best"], saved_run["best_epoch"]
            run.bad_epochs, run.stopped = saved_run["bad_epochs"], saved_run["stopped"]
        self.start_epoch = self.epochs_done = state["epochs_done"]
        logger.info("resuming %s after epoch %d", self.out, self.start_epoch)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per head: where it was saved, which epoch, and why (valid JSON: no infinities)."""
        evaluated = self.eval_store is not None
        result = {}
        for index, run in enumerate(self.runs):
            metric = run.head.config.task_def.primary_metric
            result[run.name] = {
                "dir": str(run.output_dir),
                "layers": run.head.config.layers,
                **({"layer_sweep": self.layer_sweeps[index]} if index in self.layer_sweeps else {}),
                "saved_epoch": run.best_epoch if evaluated else min(self.epochs_done, run.recipe["epochs"]),
                "selected_by": f"best {metric} on the eval store" if evaluated else
                "last epoch (no --eval-store given)",
                "best": run.best if evaluated and run.best_epoch > 0 else None,
                "metric": metric if evaluated else None,
            }
        return result



def train(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Train every head in `config` from its stores; returns each head's best eval metric and directory."""
    return Trainer(config).train()
