"""Online serving on a local Ray cluster: disaggregated (1 prefill + 1 decode) vs colocated (2 engines).

    python -m benchmarks.serving --rates 0.5 1 2 --requests 40
    python -m benchmarks.serving --control-plane --concurrency 1000 3000 10000

Workload ("ShareGPT-like"): Poisson arrivals; prompt lengths lognormal (median 160 tokens, sigma 0.6,
clipped to 16..512), output lengths lognormal (median 96, sigma 0.6, clipped to 8..256), random token
ids, greedy, ignore_eos so each request produces exactly its sampled output length. Same seeds for
both deployments. SmolLM2-135M fp32, each instance one actor with one torch thread (both cores).
Reports TTFT/TPOT p50/p90 and joint SLO attainment (TTFT <= 1 s and TPOT <= 75 ms by default).

--control-plane: a 1-layer random Llama (hidden 64) so the model costs ~nothing, 1 prefill + 1 decode;
for each `--concurrency`, that many streaming requests at once (8-token prompts, `--tokens` out);
reports streamed tokens/s, TTFT p50/max from the client, errors and the router's RSS.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def lengths(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def workload(n: int, rate: float, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(10, vocab) for _ in range(lengths(rng, 160, 0.6, 16, 512))]
        out.append((t, prompt, lengths(rng, 96, 0.6, 8, 256)))
    return out


def launch(mode: str, model_dir: str, name: str):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.scheduler import SchedulerConfig

    engine = EngineConfig(dtype="float32", num_blocks=2048, block_size=16,
                          scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048))
    group = InstanceGroup(1 if mode == "disaggregated" else 2, engine, num_cpus=1, num_threads=1)
    prefill = InstanceGroup(1, engine, num_cpus=1, num_threads=1) if mode == "disaggregated" else None
    return Cluster.launch(LaunchConfig(name=name, model_dir=model_dir, mode=mode, prefill=prefill,
                                       decode=group), timeout_s=300)


async def run_rate(client, requests) -> list:
    from tandem.engine.params import SamplingParams

    start = time.perf_counter()

    async def one(at, prompt, out_len):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        return await client.agenerate(prompt, SamplingParams(max_tokens=out_len, temperature=0,
                                                             ignore_eos=True))
    return await asyncio.gather(*(one(*r) for r in requests))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results, ttft_slo: float, tpot_slo: float) -> dict:
    ttft = [r.metrics["ttft"] for r in results]
    tpot = [r.metrics.get("tpot", 0.0) for r in results]
    ok = sum(a <= ttft_slo and b <= tpot_slo for a, b in zip(ttft, tpot))
    xfer = [r.metrics.get("transfer_time", 0.0) for r in results]
    return {"ttft_p50_ms": round(1000 * pct(ttft, 0.5)), "ttft_p90_ms": round(1000 * pct(ttft, 0.9)),
            "tpot_p50_ms": round(1000 * pct(tpot, 0.5), 1), "tpot_p90_ms": round(1000 * pct(tpot, 0.9), 1),
            "attainment": round(ok / len(results), 3),
            "transfer_share_of_ttft": round(statistics.median(x / t for x, t in zip(xfer, ttft) if t > 0), 3)}


async def serving(args) -> None:
    import ray

    from tandem.engine.prepare import prepare_model

    model_dir = str(prepare_model("smollm2"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    table = []
    for mode in args.modes:
        cluster = launch(mode, model_dir, f"bench-{mode[:5]}")
        client = cluster.client(timeout_s=900)
        try:
            await run_rate(client, workload(4, 10.0, 49152, seed=99))  # warm-up
            for rate in args.rates:
                reqs = workload(args.requests, rate, 49152, seed=int(rate * 100))
                t0 = time.perf_counter()
                results = await run_rate(client, reqs)
                row = {"mode": mode, "rate": rate, "wall_s": round(time.perf_counter() - t0, 1),
                       **summarize(results, args.ttft_ms / 1000, args.tpot_ms / 1000)}
                print(json.dumps(row), flush=True)
                table.append(row)
        finally:
            cluster.shutdown()
    ray.shutdown()


def tiny_llama(path: Path) -> str:
    """A 1-layer random Llama (hidden 64): the model costs ~nothing, the control plane is measured."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


async def stream_round(client, concurrency: int, tokens: int) -> dict:
    """``concurrency`` streams at once (8-token prompts, ``tokens`` out each), timed from the client."""
    from tandem.engine.params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()

    async def stream(i):
        n, first, errors = 0, None, 0
        async for chunk in client.astream([5 + i % 200] * 8, params):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - t0
            n += len(chunk.token_ids)
            errors += chunk.error is not None
        return n, first, errors
    results = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(concurrency)),
                                                    return_exceptions=True), 900)
    wall = time.perf_counter() - t0
    done = [r for r in results if not isinstance(r, BaseException)]
    ttft = [r[1] for r in done if r[1] is not None]
    return {"concurrency": concurrency, "tokens": sum(r[0] for r in done), "wall_s": round(wall, 2),
            "streamed_tok_s": round(sum(r[0] for r in done) / wall),
            "ttft_p50_s": round(statistics.median(ttft), 2) if ttft else None,
            "ttft_max_s": round(max(ttft), 2) if ttft else None,
            "errors": len(results) - len(done) + sum(r[2] for r in done)}


async def control_plane(args) -> None:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        cluster = launch("disaggregated", tiny_llama(Path(tmp) / "m"), "bench-cp")
        client = cluster.client(timeout_s=900)
        try:
            await stream_round(client, 64, args.tokens)  # warm-up
            for concurrency in args.concurrency:
                for _ in range(args.repeats):
                    row = await stream_round(client, concurrency, args.tokens)
                    router = cluster.stats()["router"]
                    row.update(router_rss_mb=round(router["rss_bytes"] / 2**20),
                               router_peak_rss_mb=round(router["peak_rss_bytes"] / 2**20))
                    print(json.dumps(row), flush=True)
        finally:
            cluster.shutdown()
            ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["disaggregated", "colocated"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--ttft-ms", type=float, default=1000)
    ap.add_argument("--tpot-ms", type=float, default=75)
    ap.add_argument("--control-plane", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    # One event loop for the whole run: Ray binds awaited refs to the loop that first awaits.
    asyncio.run(control_plane(args) if args.control_plane else serving(args))


if __name__ == "__main__":
    main()
