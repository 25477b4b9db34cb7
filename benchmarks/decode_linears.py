"""One decode step's linears: the native small-M GEMM (engine/kernel_linear.py) vs torch's.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.decode_linears --model smollm2 --dtype float32
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.decode_linears --model llama155m --dtype bfloat16

Builds every linear of the model's layers with its own random weight (so weights stream from
memory as in a real step, unlike a loop over one hot weight) and times, per batch size M, one pass
over all of them: ``KernelLinear`` against ``F.linear`` (MKL for fp32; oneDNN for bf16, which is
emulated on a CPU without AVX512_BF16/AMX) and, for bf16, oneDNN's prepacked ``PackedLinear``.
Median of 7 passes after 3 warm-ups; the ratio column is torch's best over the kernel. Sets ``SMALL_M``: the kernel
should win up to it.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
from torch import nn

from benchmarks.linear_shapes import median_seconds as median_of
from tandem.engine.kernel_linear import KernelLinear, small_gemm_available
from tandem.engine.packed_linear import PackedLinear, packing_available

median_seconds = partial(median_of, repeats=7)

# (out, in) of each linear per layer, the layer count, and the LM head.
MODELS = {
    "smollm2": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], 30, (49152, 576)),
    "llama155m": ([(1536, 1024), (1024, 1024), (5632, 1024), (1024, 2816)], 8, (32000, 1024)),
}


def build(model: str, dtype: torch.dtype) -> list[nn.Linear]:
    shapes, layers, head = MODELS[model]
    linears = [nn.Linear(k, n, bias=False) for _ in range(layers) for n, k in shapes]
    return [lin.to(dtype) for lin in (*linears, nn.Linear(head[1], head[0], bias=False))]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not small_gemm_available():
        raise SystemExit("the native small GEMM is not available here (no compiler, or neither AVX-512 nor AVX2)")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    linears = build(args.model, dtype)
    kernel = [KernelLinear(lin) for lin in linears]
    packed = [PackedLinear(lin) for lin in linears] if packing_available(dtype, "cpu") else None
    print(f"{args.model} {args.dtype}: {len(linears)} linears per step")
    for m in args.batches:
        xs = {lin.in_features: torch.randn(m, lin.in_features, dtype=dtype) for lin in linears}
        t_kernel = median_seconds(lambda: [layer(xs[layer.in_features]) for layer in kernel])
        t_torch = median_seconds(lambda: [lin(xs[lin.in_features]) for lin in linears])
        row = f"M={m:4d}  kernel {1e3 * t_kernel:7.1f} ms  F.linear {1e3 * t_torch:7.1f} ms"
        best = t_torch
        if packed is not None:
            t_packed = median_seconds(lambda: [layer(xs[layer.in_features]) for layer in packed])
            row += f"  oneDNN prepacked {1e3 * t_packed:7.1f} ms"
            best = min(best, t_packed)
        print(f"{row}  torch best / kernel {best / t_kernel:.2f}x", flush=True)


if __name__ == "__main__":
    main()
