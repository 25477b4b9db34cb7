"""What the instances cost, for benchmarks/sim_vs_real.py: the engine profile (the engine timed
alone in a Ray actor, as `tandem profile` does) and the KV transfer's export / fetch / hop costs,
as the simulator's step model and transfer delay.
"""
from __future__ import annotations

import random
import statistics
import time

from benchmarks.sim_vs_real_config import BLOCK_SIZE, MAX_SEQS, NUM_BLOCKS, VOCAB

# Engine profile grid: prefill (batch, prompt length); decode (pool, batch) where the pools are
# sequences prefilled once (contexts ~96 and ~256 tokens).
PREFILL_GRID = ((1, 64), (1, 160), (1, 256), (2, 128), (2, 256), (4, 96))
POOLS = {"short": (16, 96), "long": (16, 256)}
DECODE_GRID = (("short", 1), ("short", 4), ("short", 16), ("long", 1), ("long", 4), ("long", 8),
               ("long", 16))
DECODE_STEPS = 6  # decode steps timed per shape (median)
CALL_TIMEOUT_S = 300.0  # bound on every remote call (a profiler's shape takes seconds)


# -- engine profile ------------------------------------------------------------------------------

class _Profiler:
    """Runs in a Ray actor like an instance (one torch thread, Ray's worker priority) and times
    engine steps. Decode shapes draw from pools of sequences prefilled once and exported (blocks
    kept), resumed for each decode sample, so the profile takes seconds instead of re-prefilling
    every shape."""

    def __init__(self, model_dir: str) -> None:
        from tandem.engine.engine import EngineConfig
        from tandem.engine.params import SamplingParams
        from tandem.engine.scheduler import SchedulerConfig
        from tandem.transfer.hosting import build_engine

        config = EngineConfig(dtype="float32", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                              scheduler=SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=8192))
        self.engine = build_engine(model_dir, config, 1)
        self.rng = random.Random(1234)
        self.pools = {}
        params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        for name, (count, ctx) in POOLS.items():
            ids = [self.engine.add_request(self._prompt(ctx), params) for _ in range(count)]
            while self.engine.stats()["waiting"]:
                self.engine.step()
            self.pools[name] = [self.engine.export(rid) for rid in ids]

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, VOCAB) for _ in range(n)]

    def time_prefill(self, batch: int, length: int) -> float:
        from tandem.engine.params import SamplingParams

        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        ids = [self.engine.add_request(self._prompt(length), params) for _ in range(batch)]
        start = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - start
        for rid in ids:
            self.engine.abort(rid)
        return seconds

    def time_decode(self, pool: str, batch: int, steps: int) -> tuple[tuple[int, ...], float]:
        """(context lengths at the median step, median seconds of `steps` decode steps)."""
        ids = [export.state.request_id for export in self.pools[pool][:batch]]
        for rid in ids:
            self.engine.resume(rid)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
        exports = [self.engine.export(rid) for rid in ids]
        self.pools[pool][:batch] = exports
        lengths = tuple(len(e.state.token_ids) - steps + steps // 2 for e in exports)
        return lengths, statistics.median(times)


def engine_profile(model_dir: str, repeats: int):
    """The engine timed alone (no cluster running), fitted like `tandem profile`."""
    import ray

    from tandem.placement.calibrate import ProfileSample, fit_profile

    profiler = ray.remote(num_cpus=1)(_Profiler).remote(model_dir)
    samples = []
    try:
        ray.get(profiler.time_prefill.remote(1, 32), timeout=CALL_TIMEOUT_S)  # warm-up
        for _ in range(repeats):
            for batch, length in PREFILL_GRID:
                seconds = ray.get(profiler.time_prefill.remote(batch, length), timeout=CALL_TIMEOUT_S)
                samples.append(ProfileSample("prefill", 1, 1, (length,) * batch, seconds))
        for pool, batch in DECODE_GRID:
            ctx, seconds = ray.get(profiler.time_decode.remote(pool, batch, DECODE_STEPS),
                                   timeout=CALL_TIMEOUT_S)
            samples.append(ProfileSample("decode", 1, 1, ctx, seconds))
    finally:
        ray.kill(profiler)
    return fit_profile(samples, model="smollm2", hardware="cpu x1 thread, engine alone", dtype="fp32")


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept >= 0, slope >= 0) of seconds against tokens."""
    mx = statistics.mean(t for t, _ in points)
    my = statistics.mean(s for _, s in points)
    slope = max(0.0, sum((t - mx) * (s - my) for t, s in points) / sum((t - mx) ** 2 for t, _ in points))
    return max(0.0, my - slope * mx), slope


def measure_transfer(model_dir: str) -> dict[str, tuple[float, float]]:
    """(fixed s, s per prompt token) of the ray transport's export (runs in the prefill step loop
    before the first token is published) and fetch (runs in the decode step loop), and of the two
    actor-call hops between prefill-done and the decode admission (prefill -> router -> decode)."""
    from pathlib import Path

    import ray
    import torch

    from tandem.engine.config import load_config
    from tandem.engine.runner import kv_cache_shape
    from tandem.transfer.ray_transport import RayObjectTransport

    shape = kv_cache_shape(load_config(Path(model_dir)), 32, BLOCK_SIZE)
    src, dst = torch.randn(shape), torch.zeros(shape)
    out, back = RayObjectTransport(), RayObjectTransport()
    export, fetch = [], []
    for tokens in (64, 128, 256, 384, 64, 128, 256, 384):
        blocks = list(range(-(-tokens // BLOCK_SIZE)))
        e, f = [], []
        for r in range(5):
            start = time.perf_counter()
            handle = out.export(src, f"t{tokens}-{r}", blocks, tokens)
            mid = time.perf_counter()
            back.fetch(handle, dst, blocks, 30.0)
            e.append(mid - start)
            f.append(time.perf_counter() - mid)
            out.release(handle)
        export.append((tokens, statistics.median(e)))
        fetch.append((tokens, statistics.median(f)))

    class Ping:
        def ping(self) -> int:
            return 0

    ping = ray.remote(num_cpus=0)(Ping).remote()
    ray.get(ping.ping.remote(), timeout=CALL_TIMEOUT_S)
    hops = []
    for _ in range(30):
        start = time.perf_counter()
        ray.get(ping.ping.remote(), timeout=CALL_TIMEOUT_S)
        hops.append(time.perf_counter() - start)
    ray.kill(ping)
    return {"export": _line(export), "fetch": _line(fetch), "hops": (statistics.median(hops), 0.0)}


def transfer_cost(t: dict) -> tuple[float, float]:
    """The simulator's KV transfer delay: the hops plus the fetch (the decode instance pulls the KV
    at a step boundary, in its step loop; modelled as a delay before the request joins a step)."""
    return t["hops"][0] + t["fetch"][0], t["fetch"][1]


class WithExport:
    """A StepModel whose prefill also pays the KV export of each prompt (pack + object-store put),
    which the prefill instance does after the model step and before publishing the first tokens."""

    def __init__(self, inner, export: tuple[float, float]) -> None:
        self.inner, self.export = inner, export

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        latency, busy = self.inner.prefill(seqs, tokens, sum_sq)
        extra = self.export[0] * seqs + self.export[1] * tokens
        return latency + extra, busy + extra

    def decode(self, batch: int, sum_ctx: int) -> float:
        return self.inner.decode(batch, sum_ctx)

    def mixed(self, *args) -> float:
        return self.inner.mixed(*args)
