"""Checked reads: what verifying every hidden-states chunk against its checksum costs a reader.

Extracts the corpus with the packaged MiniLM (all 7 hidden states, float16) into a Zarr and an HDF5
store, then times, alternating checked and unchecked rounds on a warm page cache:
  - shuffled `Store.iter_epoch` passes (all layers, and one layer), in MB/s of hidden states delivered;
  - random access, `Store.sequence(row)` over every row in a shuffled order, in rows/s;
and the bare xxh3 rate on this CPU. "Unchecked" is the same reader with its chunk verifiers removed. Each
checked round runs next to an unchecked one (alternating which goes first); the figure is the median of
those pairs' ratios, with their range.

    HF_HUB_OFFLINE=1 python tools/bench_checked_reads.py --corpus ../shared/data/conll2003/dev.txt --repeats 5
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

import numpy as np
import xxhash
from benchargs import parse_bench_args

from featstore import CorpusSpec, ExtractConfig, extract, open_store


def epoch_mb_per_second(store, layers, seed: int) -> float:
    started = time.perf_counter()
    total = sum(item.hidden_states.nbytes for item in store.iter_epoch(layers=layers, seed=seed))
    return total / (time.perf_counter() - started) / 1e6


def rows_per_second(store, seed: int) -> float:
    order = np.random.default_rng(seed).permutation(len(store))
    started = time.perf_counter()
    for row in order:
        store.sequence(int(row))
    return len(order) / (time.perf_counter() - started)


def xxh3_gb_per_second() -> float:
    data = np.random.default_rng(0).standard_normal(2**26 // 2).astype(np.float16)
    started = time.perf_counter()
    for _ in range(10):
        xxhash.xxh3_64_intdigest(memoryview(data).cast("B"))
    return 10 * data.nbytes / (time.perf_counter() - started) / 1e9


def main() -> None:
    args, workdir = parse_bench_args(__doc__, "bench-checked-")
    logging.disable(logging.WARNING)
    results: dict = {"corpus": args.corpus, "repeats": args.repeats, "xxh3_GB_per_s": round(xxh3_gb_per_second(), 1)}
    for backend, name in (("zarr", "s.zarr"), ("hdf5", "s.h5")):
        path = workdir / name
        if not path.exists():
            extract(ExtractConfig(out=str(path), backend=backend, corpus=CorpusSpec(args.corpus), progress=False))
        os.sync()
        checked, unchecked = open_store(path), open_store(path)
        unchecked._verifier = unchecked._span_verifier = None  # the same reader without its checks
        measures = {"epoch all layers MB/s": lambda store, seed: epoch_mb_per_second(store, None, seed),
                    "epoch one layer MB/s": lambda store, seed: epoch_mb_per_second(store, [-1], seed),
                    "random access rows/s": rows_per_second}
        for label, measure in measures.items():
            measure(checked, 99)  # warm the page cache and the code paths
            rounds: dict[str, list[float]] = {"checked": [], "unchecked": []}
            for seed in range(args.repeats):
                for kind, store in (("checked", checked), ("unchecked", unchecked))[:: 1 if seed % 2 else -1]:
                    rounds[kind].append(measure(store, seed))
            # The VM's speed drifts between rounds: compare each checked round with the unchecked one next to it.
            ratios = sorted(a / b for a, b in zip(rounds["checked"], rounds["unchecked"]))
            figures = {kind: [round(value) for value in values] for kind, values in rounds.items()}
            results[f"{backend} {label}"] = {**figures, "pair ratios": [round(ratio, 3) for ratio in ratios]}
            print(f"{backend:5s} {label:22s} checked {statistics.median(rounds['checked']):9,.0f}  unchecked "
                  f"{statistics.median(rounds['unchecked']):9,.0f}  checked/unchecked per pair: median "
                  f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
        checked.close()
        unchecked.close()
    print(f"xxh3: {results['xxh3_GB_per_s']} GB/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
