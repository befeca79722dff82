"""Extraction and read benchmark (not a test): writes figures for BENCHMARKS.md.

Measures, in one run on one machine:
1. tokens/s of the bare encoder forward pass over exactly the batches extraction uses,
   vs full extraction into Zarr and into HDF5 (encoder + gather + background writes);
2. hidden-state bytes/token on disk against the raw minimum (layers x hidden x bytes), and the rate extraction
   wrote them to disk (until synced) against the disk's own sequential write bandwidth, measured on as many bytes
   (where the disk is the wall, e.g. on a GPU, that ratio is extraction's figure);
3. read throughput of `Store.iter_epoch` (shuffled, all layers) vs `numpy.memmap` reading
   the same bytes in the same spans and order.

    HF_HUB_OFFLINE=1 python tools/bench_extract.py --corpus ../shared/data/conll2003/train.txt
    HF_HUB_OFFLINE=1 python tools/bench_extract.py --device cuda --json extract-gpu.json  # float16 on the GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore import ExtractConfig, ExtractSpec, FrozenEncoder, extract, load_corpus, open_store
from featstore.extraction.corpus import CorpusSpec
from featstore.extraction.plan import ExtractionPlan
from featstore.store import format as fmt


def bare_forward_tokens_per_second(model: str | None, corpus_path: str, max_batch_tokens: int, device: str | None,
                                   dtype: str | None) -> tuple[float, int]:
    encoder = FrozenEncoder.load(model, device=device, dtype=dtype)
    spec = ExtractSpec(out="unused", model=model, max_batch_tokens=max_batch_tokens, dtype=dtype or "float16")
    plan = ExtractionPlan.build(spec, load_corpus(corpus_path), encoder)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in plan.batches():
            windows = [window for sequence in plan.sequences[batch.start:batch.stop] for window in sequence.windows]
            encoder.hidden_states(windows)
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
    return plan.num_tokens / (time.perf_counter() - started), plan.num_tokens


def disk_write_bytes_per_second(directory: Path, nbytes: int, block: int = 8 << 20) -> float:
    """Sequential write bandwidth of the disk under `directory`: `nbytes` (rounded up to whole blocks) of
    incompressible bytes written in `block`-byte writes, timed until they are on disk (fsync)."""
    data = os.urandom(block)
    blocks = max(1, -(-nbytes // block))
    probe = directory / "disk-write-probe.bin"
    os.sync()
    started = time.perf_counter()
    with open(probe, "wb") as file:
        for _ in range(blocks):
            file.write(data)
        file.flush()
        os.fsync(file.fileno())
    seconds = time.perf_counter() - started
    probe.unlink()
    return blocks * block / seconds


def read_throughput(store_path: str, raw_path: Path, seed: int = 0) -> tuple[float, float]:
    """Bytes/s of a shuffled epoch through the store vs memmap over a raw copy of the same bytes.

    Both are timed on their second pass after `os.sync()`: the first pass warms the page cache,
    and without the sync reads compete with the write-back of the stores just written.
    """
    os.sync()
    with open_store(store_path) as store:
        for _ in range(2):
            started = time.perf_counter()
            total = 0
            for item in store.iter_epoch(seed=seed):
                total += item.hidden_states.nbytes
            store_rate = total / (time.perf_counter() - started)

        shape = store.backend.shape(fmt.HIDDEN_STATES)
        dtype = store.backend.dtype(fmt.HIDDEN_STATES)
        if not raw_path.exists():
            raw = np.lib.format.open_memmap(raw_path, mode="w+", dtype=dtype, shape=shape)
            for span in store.spans():
                start, stop = int(store.token_offsets[span.start]), int(store.token_offsets[span.stop])
                raw[start:stop] = store.backend.read(fmt.HIDDEN_STATES, start, stop)
            raw.flush()
            del raw
        os.sync()
        spans = store.spans()
        for _ in range(2):
            mapped = np.load(raw_path, mmap_mode="r")
            rng = np.random.default_rng([seed, 0])
            started = time.perf_counter()
            total = 0
            for index in rng.permutation(len(spans)):
                span = spans[index]
                block = np.array(mapped[int(store.token_offsets[span.start]): int(store.token_offsets[span.stop])])
                for position in span:
                    start = int(store.token_offsets[position] - store.token_offsets[span.start])
                    stop = int(store.token_offsets[position + 1] - store.token_offsets[span.start])
                    total += block[start:stop].nbytes
            memmap_rate = total / (time.perf_counter() - started)
            del mapped
    return store_rate, memmap_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="../shared/data/conll2003/train.txt")
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not Path(args.corpus).exists():
        raise SystemExit(f"corpus {args.corpus} not found (CoNLL-2003 lives in ../shared/data/conll2003)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="featstore-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()}, "
                                             f"{torch.get_num_threads()} torch threads",
                                  "torch": torch.__version__, "corpus": args.corpus}
    bare, tokens = bare_forward_tokens_per_second(args.model, args.corpus, args.max_batch_tokens, args.device,
                                                  args.dtype)
    results["tokens"] = tokens
    results["bare_forward_tok_s"] = bare
    for backend, name in (("zarr", "train.zarr"), ("hdf5", "train.h5")):
        out = workdir / name
        result = extract(ExtractConfig(out=str(out), model=args.model, corpus=CorpusSpec(args.corpus),
                                       backend=backend, device=args.device, dtype=args.dtype,
                                       max_batch_tokens=args.max_batch_tokens, overwrite=True, progress=False))
        syncing = time.perf_counter()
        os.sync()  # what extraction wrote is on disk, as the disk probe's bytes are
        write_seconds = result.encode_seconds + time.perf_counter() - syncing
        rate = result.num_tokens / result.encode_seconds
        results[f"{backend}_extract_tok_s"] = rate
        results[f"{backend}_vs_bare"] = rate / bare
        with open_store(out) as store:
            minimum = store.num_tokens * len(store.layers) * store.hidden_size * \
                store.backend.dtype(fmt.HIDDEN_STATES).itemsize
            stored = store.backend.nbytes_stored(fmt.HIDDEN_STATES)
            results[f"{backend}_bytes_per_token"] = stored / store.num_tokens
            results[f"{backend}_overhead"] = stored / minimum - 1
            results["raw_bytes_per_token"] = minimum / store.num_tokens
        if "disk_write_MB_s" not in results:
            results["disk_write_MB_s"] = disk_write_bytes_per_second(workdir, stored) / 1e6
        results[f"{backend}_write_MB_s"] = stored / write_seconds / 1e6
        results[f"{backend}_vs_disk_write"] = results[f"{backend}_write_MB_s"] / results["disk_write_MB_s"]
        store_rate, memmap_rate = read_throughput(str(out), workdir / "raw.npy")
        results[f"{backend}_read_MB_s"] = store_rate / 1e6
        results[f"{backend}_memmap_MB_s"] = memmap_rate / 1e6
        results[f"{backend}_read_vs_memmap"] = store_rate / memmap_rate
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
