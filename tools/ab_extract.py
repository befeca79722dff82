"""A/B helper: extraction tokens/s and `iter_epoch` read MB/s of the featstore code in another checkout.

Run it alternately against two checkouts (e.g. `git worktree add /tmp/old REV`) in one sitting:

    for tree in /tmp/old . /tmp/old . /tmp/old .; do
        HF_HUB_OFFLINE=1 python tools/ab_extract.py --tree $tree --corpus ../shared/data/conll2003/dev.txt \
            --read-store /tmp/bench-extract3/train.zarr
    done
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", required=True, help="checkout whose featstore package is measured")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--read-store", help="also time shuffled epochs over this store (best of 4)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))
    logging.disable(logging.INFO)
    from featstore import CorpusSpec, ExtractConfig, extract, open_store  # names both layouts export

    out = Path(tempfile.mkdtemp(prefix="ab-extract-")) / "s.zarr"
    result = extract(ExtractConfig(out=str(out), corpus=CorpusSpec(args.corpus), progress=False))
    shutil.rmtree(out.parent)
    line = f"{args.tree}: extract {result.num_tokens / result.encode_seconds:,.0f} tok/s"
    if args.read_store:
        with open_store(args.read_store) as store:
            best = 0.0
            for seed in range(4):
                started = time.perf_counter()
                total = sum(item.hidden_states.nbytes for item in store.iter_epoch(seed=seed))
                best = max(best, total / (time.perf_counter() - started) / 1e6)
        line += f", read {best:,.0f} MB/s"
    print(line)


if __name__ == "__main__":
    main()
