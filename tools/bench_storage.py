"""Storage encodings: what each costs in bytes, speed and accuracy (not a test): BENCHMARKS.md "Storage encodings".

Phases (each writes its figures to the JSON file as it goes; a run continues a file):
- `extract`: CoNLL-2003 dev extracted by the packaged MiniLM (all 7 hidden states) in float32 (the reference)
  and in every encoding, rounds alternating the encodings' order; per encoding: bytes/token of the hidden-state
  arrays (scales included), extraction tokens/s as a ratio to float16's in the same round (median and range
  over rounds), and the relative RMS error per layer against the float32 store (||x - ref|| / ||ref||).
- `read`: warm-cache reads of each dev store, rounds alternating the order: a shuffled `iter_epoch` over all
  layers in tokens/s and MB/s of stored bytes, as ratios to float16 (median and range over rounds); and the
  same epoch with every sequence made float32, what a head consumes (float16 reads come back as float16).
- `codec`: the lossless codec (`--compression zstd`, level 5) on each encoding's dev store: bytes/token with it (as
  a ratio to the same encoding raw and to float16 raw), tokens/s of a shuffled epoch read as float32 with it as a
  ratio to the same store raw, and extraction tokens/s with it as a ratio to without, for float16 and int8 (median
  and range over rounds alternating the order).
- `heads`: CoNLL-2003 train/dev/test extracted once in float16 and converted (`featstore convert`) to each
  encoding, then the linear probe (layer 4), the scalar mix and the adapter with its tailor trained from each,
  same seeds, test F1 (mean and range over seeds).

    HF_HUB_OFFLINE=1 python tools/bench_storage.py --data ../shared/data/conll2003 --workdir /tmp/bench-storage \
        --json benchmarks/storage-2026-11-23.json --phases extract read codec
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchargs import Recorder, conll2003_parser, conll2003_setup, train_and_test

from featstore import ExtractConfig, extract, open_store
from featstore.extraction.convert import convert_store
from featstore.extraction.corpus import CorpusSpec
from featstore.store import format as fmt

ENCODINGS = ("float16", "bfloat16", "int8", "float8_e4m3")
HEADS = [{"type": "linear", "name": "linear", "layers": [4]}, {"type": "scalar_mix", "name": "scalar_mix"},
         {"type": "adapter", "name": "adapter_tailor"}]  # the adapter has its tailor by default


def _spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def _hidden_bytes(store: Any) -> int:
    return sum(store.backend.nbytes_stored(name) for name in (fmt.HIDDEN_STATES, fmt.HIDDEN_SCALES)
               if name in store.backend.array_names())


def extract_phase(data: Path, workdir: Path, record: Recorder, rounds: int) -> dict[str, str]:
    corpus = CorpusSpec(str(data / "dev.txt"), format="conll")
    stores = {dtype: str(workdir / f"dev-{dtype}.zarr") for dtype in ("float32", *ENCODINGS)}
    seconds: dict[str, list[float]] = {dtype: [] for dtype in stores}
    for index in range(rounds):
        order = list(stores) if index % 2 == 0 else list(reversed(stores))
        for dtype in order:
            started = time.perf_counter()
            extract(ExtractConfig(out=stores[dtype], corpus=corpus, dtype=dtype, overwrite=True, progress=False))
            seconds[dtype].append(time.perf_counter() - started)
    with open_store(stores["float32"]) as reference:
        tokens = reference.num_tokens
        record["dev_tokens"] = tokens
        for dtype in ENCODINGS:
            with open_store(stores[dtype]) as store:
                squared_error = np.zeros(len(store.layers))
                squared_reference = np.zeros(len(store.layers))
                for span in reference.spans():
                    start, stop = int(reference.token_offsets[span.start]), int(reference.token_offsets[span.stop])
                    want = reference.read_hidden(start, stop).astype(np.float64)
                    got = store.read_hidden(start, stop).astype(np.float64)
                    squared_error += ((got - want) ** 2).sum(axis=(0, 2))
                    squared_reference += (want**2).sum(axis=(0, 2))
                record[f"extract_{dtype}"] = {
                    "bytes_per_token": round(_hidden_bytes(store) / tokens, 1),
                    "tokens_per_s": _spread([tokens / s for s in seconds[dtype]], 0),
                    "tokens_per_s_vs_float16": _spread([f / s for f, s in zip(seconds["float16"], seconds[dtype])]),
                    "relative_rms_error_per_layer": [float(f"{value:.2e}") for value in
                                                     np.sqrt(squared_error / squared_reference)]}
    return stores


def _epoch_seconds(store: Any, seed: int) -> float:
    """One shuffled epoch over all layers, every sequence made float32 (what a head consumes)."""
    started = time.perf_counter()
    for item in store.iter_epoch(seed=seed):
        item.hidden_states.astype(np.float32, copy=False)
    return time.perf_counter() - started


def read_phase(stores: dict[str, str], record: Recorder, rounds: int) -> None:
    os.sync()
    rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    byte_rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    float32_rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    opened = {dtype: open_store(stores[dtype]) for dtype in ENCODINGS}
    for store in opened.values():  # warm the page cache
        sum(1 for _ in store.iter_epoch())
    for index in range(rounds):
        for dtype in ENCODINGS if index % 2 == 0 else reversed(ENCODINGS):
            store = opened[dtype]
            started = time.perf_counter()
            count = sum(1 for _ in store.iter_epoch(seed=index))
            elapsed = time.perf_counter() - started
            assert count == len(store)
            rates[dtype].append(store.num_tokens / elapsed)
            byte_rates[dtype].append(_hidden_bytes(store) / elapsed / 1e6)
            # what a head consumes: float32 (float16 reads come back as float16)
            float32_rates[dtype].append(store.num_tokens / _epoch_seconds(store, index))
    for dtype in ENCODINGS:
        record[f"read_{dtype}"] = {"tokens_per_s": _spread(rates[dtype], 0), "MB_per_s": _spread(byte_rates[dtype], 1),
                                   "tokens_per_s_vs_float16": _spread([r / f for r, f in zip(rates[dtype],
                                                                                             rates["float16"])]),
                                   "as_float32_tokens_per_s_vs_float16": _spread(
                                       [r / f for r, f in zip(float32_rates[dtype], float32_rates["float16"])])}
    for store in opened.values():
        store.close()


def codec_phase(data: Path, workdir: Path, record: Recorder, rounds: int, level: int = 5) -> None:
    codec = f"zstd:{level}"
    raw = {dtype: str(workdir / f"dev-{dtype}.zarr") for dtype in ENCODINGS}
    compressed = {dtype: convert_store(path, workdir / f"dev-{dtype}-zstd{level}.zarr", compression=codec,
                                       progress=False).url for dtype, path in raw.items()}
    with open_store(raw["float16"]) as reference:
        float16_bytes = _hidden_bytes(reference)
    os.sync()
    for dtype in ENCODINGS:
        with open_store(raw[dtype]) as plain, open_store(compressed[dtype]) as packed:
            for store in (plain, packed):  # warm the page cache
                _epoch_seconds(store, 0)
            ratios = []
            for index in range(rounds):
                pair = (plain, packed) if index % 2 == 0 else (packed, plain)
                seconds = {id(store): _epoch_seconds(store, index) for store in pair}
                ratios.append(seconds[id(plain)] / seconds[id(packed)])
            record[f"codec_{dtype}_{codec}"] = {
                "bytes_per_token": round(_hidden_bytes(packed) / packed.num_tokens, 1),
                "bytes_vs_raw": round(_hidden_bytes(packed) / _hidden_bytes(plain), 3),
                "bytes_vs_float16_raw": round(_hidden_bytes(packed) / float16_bytes, 3),
                "read_as_float32_tokens_per_s_vs_raw": _spread(ratios)}
    corpus = CorpusSpec(str(data / "dev.txt"), format="conll")
    for dtype in ("float16", "int8"):
        seconds: dict[str | None, list[float]] = {None: [], codec: []}
        for index in range(rounds):
            for compression in (None, codec) if index % 2 == 0 else (codec, None):
                started = time.perf_counter()
                extract(ExtractConfig(out=str(workdir / f"dev-extract-{dtype}.zarr"), corpus=corpus, dtype=dtype,
                                      compression=compression, overwrite=True, progress=False))
                seconds[compression].append(time.perf_counter() - started)
        record[f"codec_{dtype}_{codec}_extract_tokens_per_s_vs_raw"] = _spread(
            [plain / packed for plain, packed in zip(seconds[None], seconds[codec])])


def heads_phase(data: Path, workdir: Path, record: Recorder, seeds: list[int], encodings: list[str]) -> None:
    source = {split: extract(ExtractConfig(out=str(workdir / f"{split}-float16.zarr"), progress=False,
                                           corpus=CorpusSpec(str(data / f"{split}.txt"), format="conll"))).path
              for split in ("train", "dev", "test")}
    for dtype in encodings:
        stores = {split: path if dtype == "float16" else convert_store(
            path, workdir / f"{split}-{dtype}.zarr", dtype=dtype, progress=False).url
            for split, path in source.items()}
        for seed in seeds:
            key = f"heads_{dtype}_seed{seed}"
            if key in record.results:
                continue
            summary = train_and_test(stores, workdir / key, HEADS, seed=seed)
            record[key] = {name: result["test_f1"] for name, result in summary.items()}


def main() -> None:
    phases = ["extract", "read", "codec", "heads"]
    parser = conll2003_parser(__doc__, "bench-storage", phases, phases)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the extract and read phases")
    parser.add_argument("--encodings", nargs="*", default=list(ENCODINGS), choices=list(ENCODINGS),
                        help="encodings of the heads phase")
    args = parser.parse_args()
    data, workdir, record = conll2003_setup(args)
    if "extract" in args.phases or "read" in args.phases:
        stores = extract_phase(data, workdir, record, args.rounds) if "extract" in args.phases else {
            dtype: str(workdir / f"dev-{dtype}.zarr") for dtype in ENCODINGS}
        if "read" in args.phases:
            read_phase(stores, record, args.rounds)
    if "codec" in args.phases:
        codec_phase(data, workdir, record, args.rounds)
    if "heads" in args.phases:
        heads_phase(data, workdir, record, args.seeds, args.encodings)


if __name__ == "__main__":
    main()
