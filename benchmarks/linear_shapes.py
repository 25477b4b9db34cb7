"""Per-layer bf16 linear timings at decode batch sizes: where a decode step's GEMMs stand.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.linear_shapes            # llama155m shapes, M=1/8/32

Each of llama155m's linear shapes (out x in) is timed with its weight prepacked as the engine does
(engine/packed_linear.py, no batch-size hint), prepacked with the batch size as hint, and plain
``F.linear``; median of 30 calls after 3 warm-ups, weights hot in cache (a lower bound on the
in-model time, where 246 MB of weights stream per step). Prints ms, the weight read rate and GFLOP/s.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

LLAMA_155M_LINEARS = {"qkv": (1536, 1024), "o": (1024, 1024), "gate_up": (5632, 1024),
                      "down": (1024, 2816), "lm_head": (32000, 1024)}


def median_seconds(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    linear = torch.ops.mkldnn._linear_pointwise
    for name, (n, k) in LLAMA_155M_LINEARS.items():
        w = torch.randn(n, k, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        cells = []
        for m in args.batches:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            hinted = torch.ops.mkldnn._reorder_linear_weight(w, m)
            t = median_seconds(lambda: linear(x, packed, None, "none", [], ""))
            t_hint = median_seconds(lambda: linear(x, hinted, None, "none", [], ""))
            t_plain = median_seconds(lambda: torch.nn.functional.linear(x, w))
            cells.append(f"M={m}: {1e3 * t:.2f} ms ({n * k * 2 / t / 1e9:.1f} GB/s, "
                         f"{2 * m * n * k / t / 1e9:.0f} GFLOP/s) hinted {1e3 * t_hint:.2f} plain {1e3 * t_plain:.2f}")
        print(f"{name} {n}x{k} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
