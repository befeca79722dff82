"""Storage encodings: what each costs in bytes, speed and accuracy (not a test): BENCHMARKS.md "Storage encodings".

Phases (each writes its figures to the JSON file as it goes; a run continues a file):
- `extract`: CoNLL-2003 dev extracted by the packaged MiniLM (all 7 hidden states) in float32 (the reference)
  and in every encoding, rounds alternating the encodings' order; per encoding: bytes/token of the hidden-state
  arrays (scales included), extraction tokens/s as a ratio to float16's in the same round (median and range
  over rounds), and the relative RMS error per layer against the float32 store (||x - ref|| / ||ref||).
- `read`: warm-cache reads of each dev store, rounds alternating the order: a shuffled `iter_epoch` over all
  layers in tokens/s and MB/s of stored bytes, as ratios to float16 (median and range over rounds); and the
  same epoch with every sequence made float32 (float16 reads come back as float16), and the trainer's own input
  path: the epoch as padded float32 batches of 32 (`heads.batches.training_batches`, what a head is fed).
- `codec`: the lossless codec (`--compression zstd`, level 5) on each encoding's dev store: bytes/token with it (as
  a ratio to the same encoding raw and to float16 raw), tokens/s of a shuffled epoch read as float32 with it as a
  ratio to the same store raw, and extraction tokens/s with it as a ratio to without, for float16 and int8 (median
  and range over rounds alternating the order).
- `scales`: int8's scale choices compared offline on the float32 dev store's values (numpy, the same rounding and
  clipping as the extractor): one scale per token and layer (what `int8` stores), one scale per channel and layer
  from the first CALIBRATION_TOKENS tokens (values beyond it clip), and both (channels divided by their scale,
  then per-token absmax); relative RMS error per layer.
- `remote`: the dev stores of `read` (and their zstd copies from `codec`, where made) pushed to SeaweedFS on
  127.0.0.1 (`featstore push`), then a shuffled epoch read as float32 from S3, rounds alternating the order:
  tokens/s and MB/s of stored bytes, as ratios to float16 raw from S3 (median and range over rounds).
- `heads`: CoNLL-2003 train/dev/test extracted once in float16 and converted (`featstore convert`) to each
  encoding, then the linear probe (layer 4), the scalar mix and the adapter with its tailor trained from each,
  same seeds, test F1 (mean and range over seeds).

    HF_HUB_OFFLINE=1 python tools/bench_storage.py --data ../shared/data/conll2003 --workdir /tmp/bench-storage \
        --json benchmarks/storage-2026-11-23.json --phases extract read codec
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3server: the remote phase's server

import numpy as np
from benchargs import Recorder, conll2003_parser, conll2003_setup, ratios, spread, train_and_test

from featstore import ExtractConfig, extract, open_store
from featstore.extraction.convert import convert_store
from featstore.extraction.corpus import CorpusSpec
from featstore.store import format as fmt

ENCODINGS = ("float16", "bfloat16", "int8", "float8_e4m3")
HEADS = [{"type": "linear", "name": "linear", "layers": [4]}, {"type": "scalar_mix", "name": "scalar_mix"},
         {"type": "adapter", "name": "adapter_tailor"}]  # the adapter has its tailor by default


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
                    "tokens_per_s": spread([tokens / s for s in seconds[dtype]], 0),
                    "tokens_per_s_vs_float16": spread(ratios(seconds["float16"], seconds[dtype])),
                    "relative_rms_error_per_layer": [float(f"{value:.2e}") for value in
                                                     np.sqrt(squared_error / squared_reference)]}
    return stores


def _epoch_seconds(store: Any, seed: int) -> float:
    """One shuffled epoch over all layers, every sequence made float32 (what a head consumes)."""
    started = time.perf_counter()
    for item in store.iter_epoch(seed=seed):
        item.hidden_states.astype(np.float32, copy=False)
    return time.perf_counter() - started


def _batches_seconds(store: Any, seed: int) -> float:
    """One epoch of the trainer's padded float32 batches (32 sequences, all layers): what a head is fed."""
    from heads.batches import training_batches

    started = time.perf_counter()
    for _ in training_batches(store, store.layers, batch_size=32, seed=seed, epoch=0):
        pass
    return time.perf_counter() - started


def read_phase(stores: dict[str, str], record: Recorder, rounds: int) -> None:
    os.sync()
    rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    byte_rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    float32_rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
    batch_rates: dict[str, list[float]] = {dtype: [] for dtype in ENCODINGS}
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
            batch_rates[dtype].append(store.num_tokens / _batches_seconds(store, index))
    for dtype in ENCODINGS:
        record[f"read_{dtype}"] = {"tokens_per_s": spread(rates[dtype], 0), "MB_per_s": spread(byte_rates[dtype], 1),
                                   "tokens_per_s_vs_float16": spread(ratios(rates[dtype], rates["float16"])),
                                   "as_float32_tokens_per_s_vs_float16": spread(
                                       ratios(float32_rates[dtype], float32_rates["float16"])),
                                   "trainer_batches_tokens_per_s": spread(batch_rates[dtype], 0),
                                   "trainer_batches_tokens_per_s_vs_float16": spread(
                                       ratios(batch_rates[dtype], batch_rates["float16"]))}
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
            speedups = []
            for index in range(rounds):
                pair = (plain, packed) if index % 2 == 0 else (packed, plain)
                seconds = {id(store): _epoch_seconds(store, index) for store in pair}
                speedups.append(seconds[id(plain)] / seconds[id(packed)])
            record[f"codec_{dtype}_{codec}"] = {
                "bytes_per_token": round(_hidden_bytes(packed) / packed.num_tokens, 1),
                "bytes_vs_raw": round(_hidden_bytes(packed) / _hidden_bytes(plain), 3),
                "bytes_vs_float16_raw": round(_hidden_bytes(packed) / float16_bytes, 3),
                "read_as_float32_tokens_per_s_vs_raw": spread(speedups)}
    corpus = CorpusSpec(str(data / "dev.txt"), format="conll")
    for dtype in ("float16", "int8"):
        seconds: dict[str | None, list[float]] = {None: [], codec: []}
        for index in range(rounds):
            for compression in (None, codec) if index % 2 == 0 else (codec, None):
                started = time.perf_counter()
                extract(ExtractConfig(out=str(workdir / f"dev-extract-{dtype}.zarr"), corpus=corpus, dtype=dtype,
                                      compression=compression, overwrite=True, progress=False))
                seconds[compression].append(time.perf_counter() - started)
        record[f"codec_{dtype}_{codec}_extract_tokens_per_s_vs_raw"] = spread(ratios(seconds[None], seconds[codec]))


CALIBRATION_TOKENS = 8192  # "the first blocks": what an extractor would have seen before its first write
INT8_CODE_MAX = fmt.ENCODINGS["int8"].code_max


def _absmax_scales(values: np.ndarray, axis: int) -> np.ndarray:
    scales = np.abs(values).max(axis=axis, keepdims=True) / INT8_CODE_MAX
    return np.where(scales > 0, scales, 1.0)  # an all-zero row or channel: any scale decodes it


def _int8_round_trip(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values / scales), -INT8_CODE_MAX, INT8_CODE_MAX) * scales


def scales_phase(workdir: Path, record: Recorder) -> None:
    errors: dict[str, list[float]] = {"per_token": [], "per_channel": [], "per_channel_and_token": []}
    with open_store(str(workdir / "dev-float32.zarr")) as store:
        for column in range(len(store.layers)):
            values = store.read_hidden(0, store.num_tokens, [column])[:, 0].astype(np.float64)  # (T, H)
            channel = _absmax_scales(values[:CALIBRATION_TOKENS], axis=0)  # (1, H)
            smoothed = values / channel
            decoded = {"per_token": _int8_round_trip(values, _absmax_scales(values, axis=1)),
                       "per_channel": _int8_round_trip(values, channel),
                       "per_channel_and_token": _int8_round_trip(smoothed, _absmax_scales(smoothed, axis=1)) * channel}
            norm = np.linalg.norm(values)
            for name, got in decoded.items():
                errors[name].append(float(f"{np.linalg.norm(got - values) / norm:.2e}"))
    record["scales_int8_relative_rms_error_per_layer"] = {"calibration_tokens": CALIBRATION_TOKENS, **errors}


def remote_phase(workdir: Path, record: Recorder, rounds: int) -> None:
    from featstore.sharing.transfer import copy_store
    from tests.s3server import serving_bucket

    local = {f"{dtype}{suffix}": path for dtype in ENCODINGS for suffix in ("", "-zstd5")
             if (path := workdir / f"dev-{dtype}{suffix}.zarr").is_dir()}
    with serving_bucket(workdir / "seaweedfs", "bench"):
        remote = {name: copy_store(str(path), f"s3://bench/dev-{name}.zarr", progress=False).url
                  for name, path in local.items()}
        opened = {name: open_store(url) for name, url in remote.items()}
        seconds: dict[str, list[float]] = {name: [] for name in opened}
        for index in range(rounds):
            for name in opened if index % 2 == 0 else reversed(opened):
                seconds[name].append(_epoch_seconds(opened[name], index))
        for name, store in opened.items():
            tokens, stored = store.num_tokens, _hidden_bytes(store)
            record[f"remote_{name}"] = {
                "tokens_per_s": spread([tokens / s for s in seconds[name]], 0),
                "MB_per_s": spread([stored / s / 1e6 for s in seconds[name]], 1),
                "tokens_per_s_vs_float16": spread(ratios(seconds["float16"], seconds[name]))}
            store.close()


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
    phases = ["extract", "read", "codec", "scales", "remote", "heads"]
    parser = conll2003_parser(__doc__, "bench-storage", phases, phases)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of the extract, read, codec and remote phases")
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
    if "scales" in args.phases:
        scales_phase(workdir, record)
    if "remote" in args.phases:
        remote_phase(workdir, record, args.rounds)
    if "heads" in args.phases:
        heads_phase(data, workdir, record, args.seeds, args.encodings)


if __name__ == "__main__":
    main()
