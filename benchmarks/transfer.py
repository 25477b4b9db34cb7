"""KV transfer bandwidth between two actors on this machine, per transport, against ``copy_``.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.transfer                 # 1/16/64/256 MiB, 5 reps
    python -m benchmarks.transfer --sizes 64 --transports shm --repeats 9 --pattern scattered

A source actor exports a request's KV (Llama-3.2-1B layout: 16 layers, 8 KV heads x 64, block of
16 tokens, bf16 = 0.5 MiB per block) out of a 1024-block cache; a destination actor fetches it into
its own. ``fetch`` is timed in the destination from the call to the bytes being in its cache
(what a decode instance waits for); ``e2e`` adds the source's export (for ray: packing the blocks
and the put). The reference is an in-process ``copy_`` of the same number of bytes into a
preallocated, already touched tensor, timed in the destination actor in the same run, with the same
single torch thread: between random offsets of two cache-sized buffers (like the transfer, it
reads memory the CPU has not just touched), and, as a ceiling, "hot" between the same small buffers
every time (in the CPU caches below ~16 MiB). Block ids: ``scattered`` (a random subset, random order: every block its own
run, the worst case) or ``contiguous`` (one run). Medians over the repeats, spread = min..max.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import ray
import torch

LAYOUT = (16, 2, 1024, 16, 8, 64)  # [layers, K/V, blocks, block_size, kv heads, head_dim]
DTYPE = torch.bfloat16
BLOCK_BYTES = 16 * 2 * 16 * 8 * 64 * 2  # 0.5 MiB


class Peer:
    """One end: a transport and a 1024-block cache (in shared memory when the transport allocates)."""

    def __init__(self, backend: str) -> None:
        torch.set_num_threads(1)  # as an instance actor with one CPU
        from tandem.transfer.registry import make_transport

        self.transport = make_transport(backend)
        allocate = getattr(self.transport, "allocate", None)
        self.cache = allocate(LAYOUT, DTYPE) if allocate else torch.empty(LAYOUT, dtype=DTYPE)
        self.cache.view(torch.uint8).random_(0, 256)  # touches every page: no first-touch faults
        self._ref_src = self._ref_dst = None

    def export(self, request_id: str, block_ids: list[int]) -> tuple:
        start = time.perf_counter()
        handle = self.transport.export(self.cache, request_id, block_ids, len(block_ids) * 16)
        return handle, time.perf_counter() - start

    def release(self, handle) -> None:
        self.transport.release(handle)

    def fetch(self, handle, block_ids: list[int]) -> float:
        start = time.perf_counter()
        self.transport.fetch(handle, self.cache, block_ids, 60.0)
        return time.perf_counter() - start

    def copy_reference(self, nbytes: int, seed: int) -> tuple[float, float]:
        """(cold, hot) seconds of ``copy_`` of ``nbytes`` into preallocated, touched memory. Cold:
        between random offsets of two cache-sized buffers, as a transfer reads and writes blocks
        spread over two caches (the last-level cache holds little of it); hot: the same small
        buffers every time, mostly in the CPU's caches below ~16 MiB."""
        if self._ref_src is None:
            self._ref_src = torch.empty(LAYOUT, dtype=DTYPE).view(-1).view(torch.uint8).fill_(1)
            self._ref_dst = torch.empty_like(self._ref_src).fill_(0)
        rng = random.Random(seed)
        src_at, dst_at = (rng.randrange(0, self._ref_src.numel() - nbytes + 1) for _ in range(2))
        cold = _timed(self._ref_dst[dst_at:dst_at + nbytes].copy_, self._ref_src[src_at:src_at + nbytes])
        hot_dst = self._ref_dst[:nbytes]
        hot_dst.copy_(self._ref_src[:nbytes])  # bring both into cache
        hot = _timed(hot_dst.copy_, self._ref_src[:nbytes])
        return cold, hot

    def kv_source(self, transport: str, op: str, *args):
        return getattr(self.transport, f"serve_{op}")(*args)

    def close(self) -> None:
        getattr(self.transport, "close", lambda: None)()


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def block_ids(count: int, pattern: str, seed: int) -> list[int]:
    if pattern == "contiguous":
        start = random.Random(seed).randrange(0, LAYOUT[2] - count + 1)
        return list(range(start, start + count))
    return random.Random(seed).sample(range(LAYOUT[2]), count)


def measure(source, dest, mib: int, pattern: str, repeats: int) -> dict:
    count = mib * 2**20 // BLOCK_BYTES
    rows = {"fetch": [], "e2e": [], "copy": [], "hot": []}
    for rep in range(repeats + 1):  # the first round warms up (mappings, staging buffers)
        src_ids, dst_ids = block_ids(count, pattern, rep), block_ids(count, pattern, 1000 + rep)
        handle, export_s = ray.get(source.export.remote(f"r{rep}", src_ids))
        fetch_s = ray.get(dest.fetch.remote(handle, dst_ids))
        ray.get(source.release.remote(handle))
        cold_s, hot_s = ray.get(dest.copy_reference.remote(count * BLOCK_BYTES, rep))
        if rep:
            for key, value in zip(rows, (fetch_s, export_s + fetch_s, cold_s, hot_s)):
                rows[key].append(value)
    nbytes = count * BLOCK_BYTES
    gbps = {k: sorted(nbytes / s / 1e9 for s in v) for k, v in rows.items()}
    ratio = sorted(c / f for f, c in zip(rows["fetch"], rows["copy"]))
    ratio_hot = sorted(c / f for f, c in zip(rows["fetch"], rows["hot"]))
    return {"mib": mib, "pattern": pattern, "gbps": gbps, "ratio": ratio, "ratio_hot": ratio_hot,
            "fetch_ms": statistics.median(rows["fetch"]) * 1e3}


def run(transports: list[str], sizes: list[int], patterns: list[str], repeats: int) -> list[dict]:
    peer = ray.remote(num_cpus=1)(Peer)
    results = []
    for transport in transports:
        source, dest = peer.remote(transport), peer.remote(transport)
        try:
            handle, _ = ray.get(source.export.remote("first", [0]))
            first_ms = ray.get(dest.fetch.remote(handle, [0])) * 1e3  # shm: maps the source's pool
            ray.get(source.release.remote(handle))
            print(f"<!-- {transport}: first fetch from a new source {first_ms:.1f} ms -->", flush=True)
            for pattern in patterns:
                for mib in sizes:
                    row = measure(source, dest, mib, pattern, repeats)
                    results.append({"transport": transport, **row})
                    print(_line(results[-1]), flush=True)
        finally:
            ray.get([source.close.remote(), dest.close.remote()])
            for actor in (source, dest):
                ray.kill(actor)
    return results


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({values[0]:.2f}–{values[-1]:.2f})"


def _line(r: dict) -> str:
    g = r["gbps"]
    return (f"| {r['transport']} | {r['pattern']} | {r['mib']} | {r['fetch_ms']:.2f} | {_spread(g['fetch'])} "
            f"| {_spread(g['e2e'])} | {_spread(g['copy'])} | {_spread(r['ratio'])} "
            f"| {_spread(g['hot'])} | {_spread(r['ratio_hot'])} |")


HEADER = ("| transport | block ids | MiB | fetch ms | fetch GB/s | export+fetch GB/s | copy_ GB/s "
          "| fetch / copy_ | hot copy_ GB/s | fetch / hot copy_ |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", nargs="+", default=["ray", "shm", "auto"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 16, 64, 256], help="MiB")
    parser.add_argument("--pattern", choices=["scattered", "contiguous", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    patterns = ["scattered", "contiguous"] if args.pattern == "both" else [args.pattern]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        print(HEADER, flush=True)
        run(args.transports, args.sizes, patterns, args.repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
