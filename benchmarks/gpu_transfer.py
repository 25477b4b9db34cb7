"""The cuda_ipc transport against a device-to-device ``copy_`` of the same bytes, on one GPU.

    python -m benchmarks.gpu_transfer --out $OUT/transfer.json     # the GPU check's stage

The source process allocates a 256 MiB bf16 cache (1,024 blocks of 256 KiB: 8 layers, 16 tokens,
8 KV heads of 64) through the transport and exports its first 64 / 256 / 1,024 blocks (16 / 64 /
256 MiB); a destination process (spawned: CUDA IPC needs two processes) fetches each into its own
cache, timed with the copy waited for, and in the same process times ``copy_`` of the same blocks
between two of its own buffers. Medians of 5 after one warm-up; the target is >= 70% of ``copy_``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPE = (8, 2, 1024, 16, 8, 64)  # [layers, K/V, blocks, block_size, kv heads, head_dim]
SIZES_BLOCKS = (64, 256, 1024)
REPEATS = 5


def _timed(fn) -> float:
    fn()  # warm-up (opens the peer's cache on the first fetch)
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def destination(handles, queue) -> None:
    """Fetch each handle into this process's cache; time it and a local ``copy_`` of as much."""
    try:
        from tandem.transfer.cuda_ipc import CudaIpcTransport

        dest = CudaIpcTransport()
        cache = dest.allocate(SHAPE, torch.bfloat16)
        scratch = torch.empty_like(cache)
        rows = []
        for handle in handles:
            n = handle.num_blocks
            fetch_s = _timed(lambda: dest.fetch(handle, cache, list(range(n)), timeout_s=30))
            copy_s = _timed(lambda: scratch[:, :, :n].copy_(cache[:, :, :n]))
            nbytes = n * cache[:, :, :1].numel() * cache.element_size()
            rows.append({"mib": nbytes >> 20, "cuda_ipc_gb_s": round(nbytes / fetch_s / 1e9, 1),
                         "copy_gb_s": round(nbytes / copy_s / 1e9, 1), "ratio": round(copy_s / fetch_s, 2)})
        dest.close()
        queue.put(rows)
    except Exception as exc:  # the parent reports it
        queue.put(repr(exc))


def in_spawned_process(target, *args, timeout_s: float = 300.0):
    """What ``target(*args, queue)`` puts on its queue, run in a spawned process (CUDA IPC needs
    a second process); RuntimeError if it reported an error (a string) instead."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    try:
        result = queue.get(timeout=timeout_s)
    finally:
        child.join(timeout=60)
    if isinstance(result, str):
        raise RuntimeError(f"the spawned process failed: {result}")
    return result


def main() -> None:
    from tandem.transfer.cuda_ipc import CudaIpcTransport

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the result (JSON) here")
    args = ap.parse_args()
    source = CudaIpcTransport()
    cache = source.allocate(SHAPE, torch.bfloat16)
    cache.normal_()
    torch.cuda.synchronize()
    handles = [source.export(cache, f"r{n}", list(range(n)), 16 * n) for n in SIZES_BLOCKS]
    try:
        result = in_spawned_process(destination, handles)
    finally:
        for handle in handles:
            source.release(handle)
        source.close()
    report = {"device": torch.cuda.get_device_name(0), "rows": result}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
