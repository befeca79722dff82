"""Head-training benchmark on CoNLL-2003 with the packaged MiniLM (not a test): figures for BENCHMARKS.md.

1. Test entity F1 of heads trained from the store (all layers cached once): best single-layer
   linear probe (chosen on dev), scalar mix, adapter without tailor, adapter with tailor.
2. The adapter trained the reference way — live frozen encoder (eval mode) every epoch, same batches
   and recipe — vs from the store: F1 and time per epoch, as a ratio.
3. Full fine-tuning of the same encoder (all weights, 3 epochs, lr 5e-5): F1 and time ratios.
4. K = 1, 4, 8 heads in one pass over the store: time per epoch, as ratios to K = 1, with the heads batched into
   one module and one by one.
5. Closing the gap (`--sections gap`): every head type with today's defaults, each trained alone per seed
   (dev and test F1, seconds per epoch and in all, train and dev extraction counted once), against full
   fine-tuning with the same seeds in the same run: F1 and time ratios; then the heads of `--budget-heads`
   again with as many epochs as fit in a quarter of fine-tuning's time (the issue's time goal), counted
   from their default runs' seconds per epoch.
6. Speed (`--sections speed`): the adapter+tailor's steady store epoch against its arithmetic — FLOPs per epoch
   counted on the real tokens (padding excluded), the GFLOP/s this machine reaches on the matmuls of the same
   shapes, the ratio of the epoch's time to that bound; padded positions per real token, epoch time and a per-op
   profile with and without length grouping (all at the trainer's default precision, the ceiling's matmuls in the
   dtypes the profiled steps ran them in); the steady epoch in the other precision (float32 where the default is
   bfloat16, else bfloat16) against the default one, and compiled (`compile=True`) against the eager epochs in the
   precision compiled heads take (float32 on a CPU); one live
   epoch on the same batches (live/store ratio), and the ratio the arithmetic allows (the encoder's forward FLOPs
   plus the head's, over the head's).

Sections 4 and 6 time every configuration in `--rounds` rounds (the order reversed every other round) and give
each time and ratio as the median and range over rounds, ratios taken within a round: on a shared VM one epoch's
time moved by a third from one minute to the next.

    HF_HUB_OFFLINE=1 python tools/bench_heads.py --data ../shared/data/conll2003 --json bench_heads.json
    HF_HUB_OFFLINE=1 python tools/bench_heads.py --sections gap --seeds 1 2 3 --json gap.json
    HF_HUB_OFFLINE=1 python tools/bench_heads.py --sections speed k --rounds 3 --json speed.json

On a GPU (`--device cuda`): the stores are extracted there (float16), every head trains there, the live epochs run
the encoder there in float16, and section 6 profiles device time and measures the matmul ceiling on the device.
tools/gpu_checks.sh runs this with the GPU tests and the extraction benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from benchargs import Recorder, conll2003_workdir, in_rounds, ratios, spread, train_and_test

from featstore import ExtractConfig, FrozenEncoder, extract, load_corpus, open_store
from featstore.extraction.corpus import CorpusSpec
from featstore.store.reader import SequenceFeatures
from heads import Head, TrainConfig, Trainer, evaluate_heads
from heads.batches import collated_batches, on_device, padding_ratio, training_batches
from heads.metrics import tagging_metrics
from heads.packing import Layout
from heads.trainer import build_head_config, precision_name, training_dtype, training_loss

LABELS = ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]
RECIPE = {"epochs": 10, "batch_size": 32, "seed": 1, "patience": None}  # design notes, section 3
ADAPTER_LR, PROBE_LR = 1e-3, 5e-3


@dataclass
class Setup:
    """What every section runs on: the encoder (None: the packaged MiniLM) and the device stores are extracted and
    heads train on."""
    model: str | None = None
    device: str = "cpu"

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def synchronize(self) -> None:
        """Wait for the device's queued work (before reading a clock)."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    @property
    def training_dtype(self) -> torch.dtype | None:
        """The heads' training precision on this device by the trainer's default (`--precision auto`): the bench's
        own steps (live epochs, profiles) run in it as the trainer's do."""
        return training_dtype("auto", self.device)

    def live_encoder(self) -> FrozenEncoder:
        """The frozen encoder of the live runs: float32 on the CPU; on a GPU as extraction runs it (float16)."""
        return FrozenEncoder.load(self.model, device=self.device, dtype=None if self.on_cuda else "float32",
                                  progress=False)


SETUP = Setup()  # set from the command line (main)


def extract_splits(data: Path, workdir: Path, record: Recorder) -> dict[str, str]:
    stores = {}
    for split in ("train", "dev", "test"):
        started = time.perf_counter()
        result = extract(ExtractConfig(out=str(workdir / f"{split}.zarr"), corpus=CorpusSpec(
            str(data / f"{split}.txt"), label_names=LABELS), model=SETUP.model, device=SETUP.device, progress=False))
        if not result.already_complete:
            record[f"extract_{split}_seconds"] = time.perf_counter() - started
        stores[split] = result.path
    return stores


def test_f1(head_dir: Path, test_store: str) -> float:
    with open_store(test_store) as store:
        return evaluate_heads([Head.from_pretrained(head_dir)], store, device=SETUP.device)[0]["metrics"]["f1"]


def train_from_store(stores: dict[str, str], out: Path, specs: list[dict[str, Any]], epochs: int,
                     evaluate: bool = True, **options: Any) -> tuple[dict[str, Any], float]:
    """Returns the trainer summary and the mean seconds per training epoch (evaluation excluded)."""
    summary, seconds = train_epochs(stores, out, specs, epochs, evaluate, **options)
    return summary, float(np.mean(seconds))


def train_epochs(stores: dict[str, str], out: Path, specs: list[dict[str, Any]], epochs: int,
                 evaluate: bool = True, **options: Any) -> tuple[dict[str, Any], list[float]]:
    """The trainer summary and each training epoch's seconds (evaluation excluded)."""
    trainer = Trainer(TrainConfig(store=stores["train"], eval_store=stores["dev"] if evaluate else None,
                                  out=str(out), heads=specs, progress=False, device=SETUP.device,
                                  **{**RECIPE, "epochs": epochs, **options}))
    summary = trainer.train()
    return summary, [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()
                     if '"event": "epoch"' in line]


def steady_epoch_seconds(stores: dict[str, str], out: Path, specs: list[dict[str, Any]], **options: Any
                         ) -> tuple[float, float]:
    """Seconds of a first and of a steady (second) training epoch. A process's first pass over a store also pays
    for its first touch of that much fresh memory (page faults; with transparent huge pages, compaction), which
    on this VM varied from 0.4 to 4 s from run to run: the steady epoch is the figure to compare. Under the
    trainer's default `--keep-in-memory auto` the steady epoch reads nothing: its store is kept from the first."""
    _, (first, steady) = train_epochs(stores, out, specs, epochs=2, evaluate=False, **options)
    return first, steady


def steady_epoch_measure(stores: dict[str, str], out: Path, specs: list[dict[str, Any]],
                         firsts: list[float] | None = None, **options: Any) -> Callable[[], float]:
    """A measure for `in_rounds`: the seconds of a steady epoch (steady_epoch_seconds), keeping each first epoch's
    in `firsts` when given."""
    def measure() -> float:
        first, steady = steady_epoch_seconds(stores, out, specs, **options)
        if firsts is not None:
            firsts.append(first)
        return steady
    return measure


def adapter_step(head: Head, batch: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """One training step of a head on a collated batch (the live run's and the profiled steps'), with the layout
    the batch carries and the trainer's default precision, as the trainer steps."""
    loss = training_loss(head, batch["hidden_states"], batch["mask"], batch["word_ids"], batch["labels"],
                         Layout.of_batch(batch), SETUP.training_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_live_adapter(stores: dict[str, str], data: Path, out: Path, epochs: int | None = None,
                       evaluate: bool = True) -> float:
    """The reference way: the frozen encoder (eval mode) runs on every batch of every epoch. Same Head class,
    same batches (the trainer's), same optimiser, schedule and precision as the store-trained adapter; on
    SETUP.device, the encoder's features handed to the head where it computed them."""
    encoder = SETUP.live_encoder()
    train_store = open_store(stores["train"])
    extraction = train_store.manifest.extraction
    corpus = load_corpus(CorpusSpec(str(data / "train.txt"), label_names=LABELS))
    sequences = encoder.tokenize(corpus.examples, extraction.max_length, extraction.stride)
    labels = [train_store.sequence(row).labels for row in range(len(train_store))]
    torch.manual_seed(RECIPE["seed"])
    head = Head(build_head_config({"type": "adapter", "name": "adapter_live"}, train_store)).to(SETUP.device)
    epochs = epochs or RECIPE["epochs"]
    steps = -(-len(train_store) // RECIPE["batch_size"]) * epochs
    optimizer = torch.optim.AdamW(head.parameters(), lr=ADAPTER_LR, weight_decay=0.0, fused=True)  # the trainer's
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=ADAPTER_LR, total_steps=steps, pct_start=0.1,
                                                    anneal_strategy="cos")
    epoch_seconds, best = [], -1.0
    for epoch in range(epochs):
        epoch_rows = [batch["index"].tolist() for batch in training_batches(train_store, [0], RECIPE["batch_size"],
                                                                               RECIPE["seed"], epoch)]
        started = time.perf_counter()
        head.train()
        for rows in epoch_rows:
            batch_sequences = [sequences[row] for row in rows]
            # the batch's tokens, sequence after sequence: the packed rows the store's collate makes
            hidden = encoder.forward(batch_sequences, head.config.layers)
            # the rest of the batch (mask, words, labels, layout) as the store's batches carry it, without features
            items = [SequenceFeatures(row, np.empty((s.num_tokens, 0, encoder.hidden_size), np.float32), s.input_ids,
                                      s.word_ids, s.num_words, labels[row]) for row, s in zip(rows, batch_sequences)]
            batch = next(on_device(collated_batches(items, len(items)), SETUP.device))
            # a copy made outside the encoder's inference mode (float16 widened), which autograd may keep
            adapter_step(head, {**batch, "hidden_states": hidden.to(torch.float32, copy=True)}, optimizer)
            scheduler.step()
        SETUP.synchronize()
        epoch_seconds.append(time.perf_counter() - started)
        if not evaluate:
            continue
        with open_store(stores["dev"]) as dev:
            f1 = evaluate_heads([head], dev, device=SETUP.device)[0]["metrics"]["f1"]
        if f1 > best:
            best = f1
            head.save_pretrained(out)
    return float(np.mean(epoch_seconds))


def fine_tune(data: Path, out: Path, epochs: int = 3, lr: float = 5e-5, seed: int = RECIPE["seed"]
              ) -> tuple[float, float]:
    """All encoder weights trained (dropout on), token-classification head on first subwords. Returns
    (test entity F1, training seconds)."""
    from transformers import AutoModelForTokenClassification

    encoder = FrozenEncoder.load(SETUP.model, device="cpu", dtype="float32", progress=False)  # its tokenizer
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(encoder.name_or_path, num_labels=len(LABELS),
                                                            local_files_only=True).to(SETUP.device)
    train = load_corpus(CorpusSpec(str(data / "train.txt"), label_names=LABELS)).examples
    test = load_corpus(CorpusSpec(str(data / "test.txt"), label_names=LABELS)).examples

    def batches(examples, shuffle_seed=None):
        sequences = encoder.tokenize(examples)
        order = np.random.default_rng(shuffle_seed).permutation(len(examples)) if shuffle_seed is not None \
            else np.arange(len(examples))
        for start in range(0, len(order), RECIPE["batch_size"]):
            rows = order[start: start + RECIPE["batch_size"]]
            width = max(len(sequences[r].windows[0]) for r in rows)
            input_ids = torch.full((len(rows), width), encoder.pad_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            targets = torch.full((len(rows), width), -100)
            for i, row in enumerate(rows):
                window = sequences[row].windows[0]  # CoNLL sentences fit in one window
                input_ids[i, : len(window)], mask[i, : len(window)] = torch.tensor(window), 1
                word_ids = sequences[row].word_ids
                firsts = [p for p in range(len(word_ids)) if word_ids[p] >= 0 and (p == 0 or word_ids[p - 1] !=
                                                                                     word_ids[p])]
                targets[i, firsts] = torch.tensor(examples[row].label)
            yield rows, input_ids.to(SETUP.device), mask.to(SETUP.device), targets.to(SETUP.device)

    steps = -(-len(train) // RECIPE["batch_size"]) * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / (0.1 * steps),
                                                                              max(0.0, (steps - step) / (0.9 * steps))))
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for _, input_ids, mask, targets in batches(train, shuffle_seed=1000 * seed + epoch):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=targets).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    SETUP.synchronize()
    seconds = time.perf_counter() - started
    model.eval()
    gold, predicted = [], []
    with torch.inference_mode():
        for rows, input_ids, mask, targets in batches(test):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            for i, _ in enumerate(rows):
                keep = targets[i] != -100
                gold.append([LABELS[t] for t in targets[i][keep].tolist()])
                predicted.append([LABELS[t] for t in logits[i][keep].argmax(-1).tolist()])
    model.save_pretrained(out)
    return tagging_metrics(gold, predicted)["f1"], seconds


# Section 5: the heads that close the gap, each with the defaults `heads train --head TYPE` gives it
GAP_HEADS: dict[str, dict[str, Any]] = {
    "linear": {"type": "linear"}, "scalar_mix": {"type": "scalar_mix"}, "adapter_tailor": {"type": "adapter"},
    "bilstm": {"type": "bilstm"}, "bilstm_crf": {"type": "bilstm", "crf": True}, "transformer": {"type": "transformer"},
    "tail_k1": {"type": "tail", "tail_layers": 1}, "tail_k2": {"type": "tail", "tail_layers": 2},
    "tail_k2_lora": {"type": "tail", "tail_layers": 2, "lora_rank": 8},
}


TIME_GOAL = 0.25  # issue 10: a head's training, train and dev extraction included, within this share of FT's time


def closing_the_gap(stores: dict[str, str], data: Path, workdir: Path, record: Recorder, seeds: list[int],
                    heads: list[str], finetune_epochs: int, finetune_seeds: list[int], budget_heads: list[str]) -> None:
    """Fine-tuning first (the denominator, averaged over `finetune_seeds`), then each head alone per seed,
    with the trainer's defaults; then each of `budget_heads` with as many epochs as fit in TIME_GOAL of
    fine-tuning's time (from its default runs' seconds per epoch)."""
    extraction = record.results["extract_train_seconds"] + record.results["extract_dev_seconds"]
    for seed in finetune_seeds:
        key = f"gap_finetune_seed{seed}"
        if key not in record.results:
            f1, seconds = fine_tune(data, workdir / f"finetuned_seed{seed}", epochs=finetune_epochs, seed=seed)
            record[key] = {"test_f1": 100 * f1, "train_seconds": seconds, "epochs": finetune_epochs}
    finetune = [record.results[f"gap_finetune_seed{seed}"] for seed in finetune_seeds]
    finetune_f1 = float(np.mean([run["test_f1"] for run in finetune]))
    finetune_seconds = float(np.mean([run["train_seconds"] for run in finetune]))

    def runs(label: str, spec: dict[str, Any], **options: Any) -> None:
        for seed in seeds:
            key = f"gap_{label}_seed{seed}"
            if key in record.results:
                continue
            out = workdir / f"gap_{label}_seed{seed}"
            result = train_and_test(stores, out, [{**spec, "name": label}], seed=seed, device=SETUP.device,
                                    **options)[label]
            epochs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if '"event": "epoch"' in line]
            record[key] = {"dev_f1": result["best"], "test_f1": result["test_f1"], "epochs_run": len(epochs),
                           "saved_epoch": result["saved_epoch"], "epoch_seconds": float(np.mean(epochs)),
                           "train_seconds": float(np.sum(epochs)), **options}
        results = [record.results[f"gap_{label}_seed{seed}"] for seed in seeds]
        total = extraction + float(np.mean([run["train_seconds"] for run in results]))
        test = [run["test_f1"] for run in results]
        record[f"gap_{label}"] = {
            "dev_f1_mean": float(np.mean([run["dev_f1"] for run in results])),
            "dev_f1_std": float(np.std([run["dev_f1"] for run in results])),
            "test_f1_mean": float(np.mean(test)), "test_f1_std": float(np.std(test)),
            "epoch_seconds": float(np.mean([run["epoch_seconds"] for run in results])),
            "seconds_incl_extraction": total,
            "f1_vs_finetune": float(np.mean(test)) / finetune_f1, "time_vs_finetune": total / finetune_seconds}

    for name in dict.fromkeys(heads + budget_heads):  # a budget head's default runs give its seconds per epoch
        runs(name, GAP_HEADS[name])
    for name in budget_heads:
        budget = TIME_GOAL * finetune_seconds - extraction
        epochs = int(budget // record.results[f"gap_{name}"]["epoch_seconds"])
        if epochs < 1:
            raise SystemExit(f"{name}: one epoch does not fit in {TIME_GOAL} of fine-tuning's time")
        runs(f"{name}_budget", GAP_HEADS[name], epochs=epochs)


# Section 6: the adapter's store epoch against what its arithmetic costs
MATMULS = {"aten::mm": 0, "aten::addmm": 1, "aten::bmm": 0}  # profiler op -> index of its first matrix input
# the profiler's names of the dtypes a step's matrix products run in (float32; under autocast bfloat16 or float16)
PROFILER_DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}


class MatmulCall(NamedTuple):
    """A matrix product a profiled step made: the op, its input shapes and the dtype of its matrices."""
    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str


def epoch_flops(head: Head, shapes: Counter[tuple[int, int]]) -> int:
    """FLOPs of forward + backward over an epoch's real tokens: each sequence alone, unpadded (counted once per
    distinct (tokens, words) shape by torch's FlopCounterMode: matmuls, the arithmetic that dominates)."""
    from torch.utils.flop_counter import FlopCounterMode

    total, layers = 0, len(head.config.layers)
    for (tokens, words), count in shapes.items():
        hidden = torch.randn(1, tokens, layers, head.config.hidden_size)
        mask = torch.ones(1, tokens, dtype=torch.bool)
        word_ids = torch.arange(tokens).clamp(max=words - 1)[None]
        counter = FlopCounterMode(display=False)
        with counter:
            output = head(hidden, mask, word_ids, words)
            head.loss(output, torch.zeros(1, words, dtype=torch.long)).backward()
        total += count * counter.get_total_flops()
    return total


def matmul_ceiling(calls: Counter[MatmulCall], min_seconds: float = 0.02) -> float:
    """GFLOP/s of this machine (SETUP.device) on the given matmul calls (with their counts), each timed alone on
    fresh random operands of its shapes and dtype."""
    flops = seconds = 0.0
    for (name, shapes, dtype), count in calls.items():
        operands = [torch.randn(shape, device=SETUP.device, dtype=PROFILER_DTYPES[dtype])
                    for shape in shapes[MATMULS[name]: MATMULS[name] + 2]]
        operation = torch.bmm if name == "aten::bmm" else torch.mm
        a, b = operands
        operation(a, b)  # warm-up
        SETUP.synchronize()
        repeats, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < min_seconds:
            for _ in range(10):  # a GPU's products are queued: ten between clock reads
                operation(a, b)
            repeats += 10
            SETUP.synchronize()
        batch = a.shape[0] if a.dim() == 3 else 1
        flops += count * 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        seconds += count * elapsed / repeats
    return flops / seconds / 1e9


def profile_steps(stores: dict[str, str], group_by_length: bool, steps: int = 60
                  ) -> tuple[list[dict[str, Any]], Counter[MatmulCall]]:
    """Per-op self time (CPU time; on a GPU, device time) over `steps` adapter+tailor training steps (the trainer's
    batches, optimiser and default precision), and the matmul calls (op, input shapes, dtype) they made."""
    from torch.profiler import ProfilerActivity, profile

    with open_store(stores["train"]) as store:
        torch.manual_seed(RECIPE["seed"])
        head = Head(build_head_config({"type": "adapter"}, store)).to(SETUP.device).train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=ADAPTER_LR, fused=True)
        batches = list(on_device(islice(training_batches(store, head.config.layers, RECIPE["batch_size"],
                                                         RECIPE["seed"], 0, group_by_length), steps), SETUP.device))
    adapter_step(head, batches[0], optimizer)  # warm-up
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if SETUP.on_cuda else [])]
    with profile(activities=activities, record_shapes=True) as profiler:
        for batch in batches:
            adapter_step(head, batch, optimizer)
        SETUP.synchronize()

    def self_time(event: Any) -> float:
        return event.self_device_time_total if SETUP.on_cuda else event.self_cpu_time_total

    events = profiler.key_averages()
    total = sum(self_time(event) for event in events)
    top = sorted(events, key=self_time, reverse=True)[:12]
    table = [{"op": event.key, "calls": event.count, "self_ms_per_step": self_time(event) / 1e3 / steps,
              "share": self_time(event) / total} for event in top]
    calls: Counter[MatmulCall] = Counter()
    for event in profiler.events():
        if event.name in MATMULS:
            inputs = [(tuple(shape), dtype) for shape, dtype in zip(event.input_shapes, event.input_dtypes) if shape]
            calls[MatmulCall(event.name, tuple(shape for shape, _ in inputs), inputs[MATMULS[event.name]][1])] += 1
    return table, calls


def optimizer_step_ms(head: Head, options: dict[str, Any], steps: int = 300) -> float:
    """Milliseconds per AdamW step over the head's parameters (random gradients) with these implementation
    options."""
    parameters = [parameter for parameter in head.to(SETUP.device).parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, **options)
    optimizer.step()
    SETUP.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    SETUP.synchronize()
    return (time.perf_counter() - started) / steps * 1e3


def encoder_epoch_flops(shapes: Counter[tuple[int, int]]) -> int:
    """FLOPs of the frozen encoder's forward pass (all hidden states) over an epoch's sequences, each alone."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = FrozenEncoder.load(SETUP.model, device="cpu", dtype="float32", progress=False).model
    lengths = Counter[int]()
    for (tokens, _), count in shapes.items():
        lengths[tokens] += count
    total = 0
    for tokens, count in lengths.items():
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            encoder(input_ids=torch.ones(1, tokens, dtype=torch.long), output_hidden_states=True)
        total += count * counter.get_total_flops()
    return total


def adapter_speed(stores: dict[str, str], data: Path, workdir: Path, record: Recorder, rounds: int) -> None:
    with open_store(stores["train"]) as store:
        for grouped in (False, True):
            batches = training_batches(store, [0], RECIPE["batch_size"], RECIPE["seed"], 0, grouped)
            record[f"speed_padded_positions_per_token_{'grouped' if grouped else 'plain'}"] = padding_ratio(batches)
        shapes = Counter((len(item.hidden_states), item.num_words)
                         for item in store.iter_epoch(layers=[0], shuffle=False))
        head = Head(build_head_config({"type": "adapter"}, store)).train()
    flops = epoch_flops(head, shapes)
    record["speed_adapter_epoch_gflop"] = flops / 1e9
    # the classifier's two maps applied one after another to each word, as written in the design notes (and as run
    # before they ran as their product, heads.layers.LinearChain), for comparison with earlier runs
    chain, on_tokens = head.classifier, head.classifies_tokens
    head.classifier, head.classifies_tokens = torch.nn.Sequential(*chain), False
    record["speed_adapter_epoch_gflop_classifier_unchained"] = epoch_flops(head, shapes) / 1e9
    head.classifier, head.classifies_tokens = chain, on_tokens
    # the other training precision against the default one (`--precision auto`: bfloat16 where the device multiplies
    # it natively, heads.trainer.training_dtype), on the same (plain) batches
    default = precision_name(SETUP.training_dtype)
    other = "float32" if default == "bfloat16" else "bfloat16"
    record["speed_precision"] = default
    adapter = [{"type": "adapter"}]
    measures: dict[str, Callable[[], float]] = {}
    firsts: dict[str, list[float]] = {"plain": [], "grouped": [], "compiled": []}
    for grouped in (False, True):
        kind = "grouped" if grouped else "plain"
        record[f"speed_profile_{kind}"], calls = profile_steps(stores, grouped)
        measures[f"ceiling_{kind}"] = partial(matmul_ceiling, calls)
        measures[kind] = steady_epoch_measure(stores, workdir / f"speed_adapter_{kind}", adapter, firsts[kind],
                                              group_by_length=grouped)
    measures[other] = steady_epoch_measure(stores, workdir / f"speed_adapter_{other}", adapter, precision=other)
    compiled = steady_epoch_measure(stores, workdir / "speed_adapter_compiled", adapter, firsts["compiled"],
                                    compile=True)

    def compiled_afresh() -> float:
        torch.compiler.reset()  # each round compiles as a new process would (and stays within the recompile limit)
        return compiled()

    measures["compiled"] = compiled_afresh
    # the trainer's default (plain) batches, as the store's
    measures["live"] = partial(train_live_adapter, stores, data, workdir / "speed_adapter_live", epochs=1,
                               evaluate=False)
    seconds = in_rounds(measures, rounds)
    for kind in ("plain", "grouped"):
        ceilings = seconds[f"ceiling_{kind}"]  # GFLOP/s, measured next to the epoch
        record[f"speed_matmul_ceiling_gflops_{kind}"] = spread(ceilings, 1)
        record[f"speed_adapter_first_epoch_seconds_{kind}"] = spread(firsts[kind], 2)
        record[f"speed_adapter_epoch_seconds_{kind}"] = spread(seconds[kind], 2)
        record[f"speed_adapter_achieved_gflops_{kind}"] = spread([flops / 1e9 / each for each in seconds[kind]], 1)
        record[f"speed_adapter_epoch_vs_compute_bound_{kind}"] = spread(
            [epoch / (flops / 1e9 / ceiling) for epoch, ceiling in zip(seconds[kind], ceilings)])
    seconds[default] = seconds["plain"]  # the plain epochs ran in the default precision
    record[f"speed_adapter_{other}_epoch_seconds"] = spread(seconds[other], 2)
    record["speed_adapter_bfloat16_vs_float32"] = spread(ratios(seconds["bfloat16"], seconds["float32"]))
    # --compile: the first epoch also compiles (and recompiles for dynamic shapes); the steady one is the figure
    record["speed_adapter_compiled_first_epoch_seconds"] = spread(firsts["compiled"], 2)
    record["speed_adapter_compiled_epoch_seconds"] = spread(seconds["compiled"], 2)
    # against the eager epochs in the precision compiled heads take by default (on a CPU float32: heads.trainer)
    compiled_precision = precision_name(training_dtype("auto", SETUP.device, compiled=True))
    record["speed_adapter_compiled_vs_eager"] = spread(ratios(seconds["compiled"], seconds[compiled_precision]))
    # What live/store can reach at equal arithmetic speed: a live epoch also runs the encoder's forward pass.
    encoder_flops = encoder_epoch_flops(shapes)
    record["speed_encoder_forward_epoch_gflop"] = encoder_flops / 1e9
    record["speed_live_vs_store_arithmetic_ratio"] = (encoder_flops + flops) / flops
    adamw_variants = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for variant, options in adamw_variants.items():
        record[f"speed_adamw_{variant}_ms_per_step"] = optimizer_step_ms(head, options)
    record["speed_adapter_live_epoch_seconds"] = spread(seconds["live"], 2)
    record["speed_live_vs_store_epoch_time"] = spread(ratios(seconds["live"], seconds["plain"]))


def k_heads_timing(stores: dict[str, str], workdir: Path, record: Recorder, rounds: int) -> None:
    """A steady epoch (the second; evaluation excluded) of K = 1, 4, 8 heads in one pass on the trainer's default
    batches, as ratios to K = 1 in the same round (`in_rounds`): adapters that differ only in hyper-parameters
    (learning rate, seed) and linear probes, one per layer from the top (K = 8 on a 6-layer encoder: every layer,
    the top one twice), also at K = every layer once (the sweep of `heads sweep`); each batched into one module
    (`batch_heads="always"`) and stepped one after another (`"never"`); and 4 heads of each other batchable type
    both ways."""
    with open_store(stores["train"]) as store:
        stored = list(store.layers)
    layers = len(stored)
    top_down = [stored[-1 - k % layers] for k in range(8)]
    sweeps = {
        "linear_probes": [{"type": "linear", "layers": [layer], "name": f"linear{k}", "lr": PROBE_LR}
                          for k, layer in enumerate(top_down)],
        "adapters": [{"type": "adapter", "name": f"adapter{k}", "lr": ADAPTER_LR * (1 + k % 4), "seed": 1 + k // 4}
                     for k in range(8)],
    }
    counts = {"linear_probes": sorted({1, 4, layers, 8}), "adapters": [1, 4, 8]}
    measures: dict[str, Callable[[], float]] = {}
    for sweep, specs in sweeps.items():
        for batched in (True, False):
            kind = sweep if batched else f"{sweep}_one_by_one"
            for k in counts[sweep]:
                measures[f"k{k}_{kind}"] = steady_epoch_measure(stores, workdir / f"k_{kind}_{k}", specs[:k],
                                                                batch_heads="always" if batched else "never")
    # 4 heads of each other batchable type (HeadType.batched_on_cpu: which ones `--batch-heads auto` batches on the
    # CPU), seeds apart, mlp probes on the layers `top_down` starts with: batched against one by one
    types = ("scalar_mix", "mlp", "fusion")
    for head_type in types:
        specs = [{"type": head_type, "name": f"{head_type}{k}", "seed": 1 + k,
                  **({"layers": [top_down[k]]} if head_type == "mlp" else {})} for k in range(4)]
        for batch_heads in ("always", "never"):
            measures[f"k4_{head_type}_{batch_heads}"] = steady_epoch_measure(
                stores, workdir / f"k4_{head_type}_{batch_heads}", specs, batch_heads=batch_heads)
    seconds = in_rounds(measures, rounds)
    for sweep in sweeps:
        for kind in (sweep, f"{sweep}_one_by_one"):
            for k in counts[sweep]:
                record[f"k{k}_{kind}_epoch_seconds"] = spread(seconds[f"k{k}_{kind}"], 2)
                record[f"k{k}_{kind}_vs_k1"] = spread(ratios(seconds[f"k{k}_{kind}"], seconds[f"k1_{kind}"]))
    for head_type in types:
        batched, one_by_one = seconds[f"k4_{head_type}_always"], seconds[f"k4_{head_type}_never"]
        record[f"k4_{head_type}_batched_epoch_seconds"] = spread(batched, 2)
        record[f"k4_{head_type}_one_by_one_epoch_seconds"] = spread(one_by_one, 2)
        record[f"k4_{head_type}_one_by_one_vs_batched"] = spread(ratios(one_by_one, batched))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/conll2003")
    parser.add_argument("--workdir", default="bench-heads")
    parser.add_argument("--device", default=SETUP.device,
                        help="where stores are extracted, heads train and live epochs run (e.g. cuda)")
    parser.add_argument("--model", default=SETUP.model,
                        help="the encoder's local directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--json", help="write figures here as they are measured")
    parser.add_argument("--sections", nargs="*", default=["store", "k", "live", "finetune"],
                        choices=["store", "k", "live", "finetune", "gap", "speed"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["store", "live", "finetune", "k"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3], help="gap: seeds of every run")
    parser.add_argument("--finetune-seeds", type=int, nargs="*",
                        help="gap: seeds of the fine-tuning runs (default: --seeds; fewer when 3 do not fit)")
    parser.add_argument("--gap-heads", nargs="*", default=list(GAP_HEADS), choices=list(GAP_HEADS))
    parser.add_argument("--budget-heads", nargs="*", default=["bilstm_crf"], choices=list(GAP_HEADS),
                        help="gap: heads also trained with as many epochs as fit in a quarter of fine-tuning's time")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="head epochs (recipe: 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="speed and k: rounds of every timing (default 3; each figure: the median and range "
                        "over rounds)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    SETUP.device, SETUP.model = args.device, args.model
    data, workdir = Path(args.data), Path(args.workdir)
    conll2003_workdir(data, workdir)
    RECIPE["epochs"] = args.epochs
    record = Recorder(Path(args.json) if args.json else None, keep_existing=True)  # a run continues its file
    stores = extract_splits(data, workdir, record)
    skip = set(args.skip) | {section for section in ("store", "k", "live", "finetune") if section not in args.sections}
    if "speed" in args.sections:
        adapter_speed(stores, data, workdir, record, args.rounds)
    if "gap" in args.sections:
        closing_the_gap(stores, data, workdir, record, args.seeds, args.gap_heads, args.finetune_epochs,
                        args.seeds if args.finetune_seeds is None else args.finetune_seeds, args.budget_heads)

    if "store" not in skip:
        specs = [{"type": "linear", "layers": [layer], "name": f"linear_L{layer}", "lr": PROBE_LR}
                 for layer in range(7)]
        specs += [{"type": "scalar_mix", "name": "scalar_mix", "lr": PROBE_LR},
                  {"type": "adapter", "name": "adapter_no_tailor", "enable_tailor": False, "lr": ADAPTER_LR},
                  {"type": "adapter", "name": "adapter_tailor", "lr": ADAPTER_LR}]
        summary, seconds = train_from_store(stores, workdir / "store_heads", specs, RECIPE["epochs"])
        record["store_all_heads_epoch_seconds"] = seconds
        best_probe = max((name for name in summary if name.startswith("linear")), key=lambda n: summary[n]["best"])
        record["best_linear_probe"] = best_probe
        for name in (best_probe, "scalar_mix", "adapter_no_tailor", "adapter_tailor"):
            record[f"test_f1_{name}"] = test_f1(Path(summary[name]["dir"]), stores["test"])
    if "k" not in skip:
        k_heads_timing(stores, workdir, record, args.rounds)
    if "live" not in skip:
        _, store_seconds = train_from_store(stores, workdir / "adapter_store", [
            {"type": "adapter", "name": "adapter", "lr": ADAPTER_LR}], RECIPE["epochs"])
        record["adapter_store_epoch_seconds"] = store_seconds
        record["test_f1_adapter_store"] = test_f1(workdir / "adapter_store", stores["test"])
        live_seconds = train_live_adapter(stores, data, workdir / "adapter_live")
        record["adapter_live_epoch_seconds"] = live_seconds
        record["test_f1_adapter_live"] = test_f1(workdir / "adapter_live", stores["test"])
        record["live_vs_store_epoch_time"] = live_seconds / store_seconds
    if "finetune" not in skip:
        f1, seconds = fine_tune(data, workdir / "finetuned", epochs=args.finetune_epochs)
        record["test_f1_finetune"] = f1
        record["finetune_train_seconds"] = seconds
        adapter_f1 = record.results.get("test_f1_adapter_tailor", record.results.get("test_f1_adapter_store"))
        if adapter_f1 is not None:
            record["adapter_vs_finetune_f1"] = adapter_f1 / f1
        adapter_seconds = record.results.get("adapter_store_epoch_seconds")
        extract_seconds = record.results.get("extract_train_seconds")
        if adapter_seconds is not None and extract_seconds is not None:
            adapter_total = extract_seconds + RECIPE["epochs"] * adapter_seconds
            record["adapter_total_seconds_incl_extraction"] = adapter_total
            record["finetune_vs_adapter_train_time"] = seconds / adapter_total


if __name__ == "__main__":
    main()
