"""Store half of bench_heads' live-vs-store comparison, with float32 stores (not a test).

Live adapter training runs the encoder in float32; the default stores hold float16. This trains the
same adapter (same recipe and batch order) from float32 stores to separate storage rounding from
the cache mechanism.

    HF_HUB_OFFLINE=1 python tools/bench_heads_fp32.py --data ../shared/data/conll2003 --workdir /tmp/bench-heads-fp32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_heads import ADAPTER_LR, LABELS, test_f1, train_from_store

from featstore import ExtractConfig, extract
from featstore.extraction.corpus import CorpusSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/conll2003")
    parser.add_argument("--workdir", default="bench-heads-fp32")
    args = parser.parse_args()
    data, workdir = Path(args.data), Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stores = {split: extract(ExtractConfig(out=str(workdir / f"{split}.zarr"), dtype="float32", progress=False,
                                           corpus=CorpusSpec(str(data / f"{split}.txt"), label_names=LABELS))).path
              for split in ("train", "dev", "test")}
    _, seconds = train_from_store(stores, workdir / "adapter", [{"type": "adapter", "name": "adapter",
                                                                 "lr": ADAPTER_LR}], epochs=10)
    print(json.dumps({"float32_store_adapter_test_f1": test_f1(workdir / "adapter", stores["test"]),
                      "float32_store_epoch_seconds": seconds}))


if __name__ == "__main__":
    main()
