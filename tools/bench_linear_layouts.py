"""Linear maps of K batched heads: which layout of the matrix product is faster on this machine's CPU.

`heads.layers.linear` computes a narrow map (a classifier's few outputs) of heads batched under vmap
(heads/grouped.py) as (W X^T)^T instead of `nn.functional.linear`, and leaves one head alone to
`nn.functional.linear`; `NARROW_OUTPUTS` says which maps are narrow. This
times, for each output width, a forward and backward pass of both layouts (the median of --repeats rounds,
each the best of 5 timings of 50 passes, rounds alternating which layout goes first), with and without the
input's gradient:
  - batched: K heads under vmap, each reading its own column of (N, K, H) features (a layer sweep);
  - alone: one head, a plain (N, H) x (H, C) product.
Ratios above 1 mean the batched form (W X^T)^T is the faster.

    python tools/bench_linear_layouts.py --json benchmarks/linear-layouts-2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import vmap

from heads.layers import NARROW_OUTPUTS, linear_by_rows

HIDDEN = 384
OUTPUTS = (2, 9, 15, 16, 24, 33, 64)
LAYOUTS: dict[str, Callable] = {"plain": torch.nn.functional.linear, "by_rows": linear_by_rows}


def pass_seconds(layout: Callable, heads: int | None, rows: int, outputs: int, input_grad: bool) -> float:
    """Best of 5 timings of a forward and backward pass (features rotated among 8 tensors, as fresh batches)."""
    shape = (rows, heads, HIDDEN) if heads else (rows, HIDDEN)
    features = [torch.randn(shape, requires_grad=input_grad) for _ in range(8)]
    weight = torch.randn((heads, outputs, HIDDEN) if heads else (outputs, HIDDEN), requires_grad=True)
    bias = torch.randn((heads, outputs) if heads else (outputs,), requires_grad=True)
    run = vmap(layout, in_dims=(1, 0, 0)) if heads else layout

    def one_pass(x: torch.Tensor) -> None:
        out = run(x, weight, bias)
        out.backward(torch.ones_like(out))

    for x in features:
        one_pass(x)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        for step in range(50):
            one_pass(features[step % 8])
        timings.append((time.perf_counter() - started) / 50)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=7, help="K batched heads")
    parser.add_argument("--rows", type=int, nargs="*", default=[100, 500, 2000], help="tokens (N) per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                     "heads": args.heads, "hidden": HIDDEN, "narrow_outputs_below": NARROW_OUTPUTS, "rows": []}
    for heads in (args.heads, None):
        for input_grad in (False, True):
            for rows in args.rows:
                for outputs in OUTPUTS:
                    ratios, seconds = [], {"plain": [], "by_rows": []}
                    for repeat in range(args.repeats):
                        order = ("plain", "by_rows") if repeat % 2 == 0 else ("by_rows", "plain")
                        timed = {name: pass_seconds(LAYOUTS[name], heads, rows, outputs, input_grad)
                                 for name in order}
                        for name, value in timed.items():
                            seconds[name].append(value)
                        ratios.append(timed["plain"] / timed["by_rows"])
                    row = {"batched": heads is not None, "input_grad": input_grad, "rows": rows, "outputs": outputs,
                           "plain_ms": 1e3 * statistics.median(seconds["plain"]),
                           "by_rows_ms": 1e3 * statistics.median(seconds["by_rows"]),
                           "plain_over_by_rows": statistics.median(ratios),
                           "ratio_range": [min(ratios), max(ratios)]}
                    results["rows"].append(row)
                    print(f"{'batched' if row['batched'] else 'alone  '} input grad {int(input_grad)} N {rows:5d} "
                          f"C {outputs:4d}: linear {row['plain_ms']:.3f} ms, (W X^T)^T {row['by_rows_ms']:.3f} ms, "
                          f"ratio {row['plain_over_by_rows']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
                    if args.json:
                        with open(args.json, "w") as handle:
                            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
