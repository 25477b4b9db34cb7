"""A skewed load on two decode instances, with live migration off and on, in the same run.

    python -m benchmarks.skewed                       # 24 requests, 1 prefill + 2 decode, SmolLM2
    python -m benchmarks.skewed --requests 32 --rate 1.5 --repeats 2
    python -m benchmarks.skewed --long 320 --migration off on growth   # growth-aware freeness too

SmolLM2-135M (fp32) on a local Ray cluster: 1 prefill + 2 decode instances, one torch thread each,
96 KV blocks (1,536 tokens) per decode instance, round-robin decode dispatch. Requests alternate
long (``--long`` output tokens) and short (``--short``), so every long one lands on the same decode
instance, whose KV fills while the other's empties: without migration it preempts (and recomputes);
with ``migration: {enabled: true}`` the rebalancer moves requests to the other instance (``growth``:
also ``growth_horizon_tokens: --horizon``, so freeness counts what requests will grow into). Poisson
arrivals at ``--rate`` per second, 64..128-token random prompts, greedy, ignore_eos, same seeds
for both. Reports, timed from the client: TTFT and TPOT p50/p99, joint SLO attainment (TTFT <=
``--ttft-ms`` and TPOT <= ``--tpot-ms``), the decode instances' preemptions and migrations.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.serving import pct, run_rate  # noqa: E402  (same client-side timing as serving)


def launch(model_dir: str, name: str, mode: str, horizon: int):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.cluster.spec_types import MigrationSpec
    from tandem.engine.engine import EngineConfig

    engine = EngineConfig(dtype="float32", num_blocks=96, block_size=16)
    group = lambda n: InstanceGroup(n, engine, num_cpus=0.5, num_threads=1)  # noqa: E731
    config = LaunchConfig(name=name, model_dir=model_dir, prefill=group(1), decode=group(2),
                          transfer_backend="shm", decode_policy="round_robin",
                          migration=MigrationSpec(enabled=mode != "off",
                                                  growth_horizon_tokens=horizon if mode == "growth" else 0))
    return Cluster.launch(config, timeout_s=300)


def workload(args, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt ids, output tokens), alternating long and short outputs."""
    rng = random.Random(seed)
    at, requests = 0.0, []
    for i in range(args.requests):
        at += rng.expovariate(args.rate)
        prompt = [rng.randrange(10, 49000) for _ in range(rng.randint(64, 128))]
        requests.append((at, prompt, args.long if i % 2 == 0 else args.short))
    return requests


def preemptions(cluster) -> int:
    return sum(s.get("preemptions", 0) for name, s in cluster.stats()["instances"].items() if "-decode-" in name)


def summarize(results, args) -> dict:

    ttft = [r.metrics["ttft"] for r in results]
    tpot = [r.metrics.get("tpot", 0.0) for r in results]
    ok = sum(a <= args.ttft_ms / 1000 and b <= args.tpot_ms / 1000 for a, b in zip(ttft, tpot))
    return {"ttft_p50_ms": round(1000 * pct(ttft, 0.5)), "ttft_p99_ms": round(1000 * pct(ttft, 0.99)),
            "tpot_p50_ms": round(1000 * pct(tpot, 0.5), 1), "tpot_p99_ms": round(1000 * pct(tpot, 0.99), 1),
            "attainment": round(ok / len(results), 3),
            "errors": sum(r.error is not None for r in results),
            "migrations": int(sum(r.metrics.get("num_migrations", 0) for r in results))}


async def main_async(args) -> None:
    import ray

    from tandem.engine.prepare import prepare_model

    model_dir = str(prepare_model("smollm2"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="tandem", log_to_driver=False)
    rows = []
    for mode in args.migration:
        cluster = launch(model_dir, f"skew-{mode}", mode, args.horizon)
        client = cluster.client(timeout_s=900)
        try:
            await run_rate(client, [(0.0, [5] * 16, 4)] * 2)  # warm-up
            for repeat in range(args.repeats):
                before = preemptions(cluster)
                results = await run_rate(client, workload(args, seed=repeat))
                row = {"migration": mode, "repeat": repeat,
                       **summarize(results, args), "preemptions": preemptions(cluster) - before}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.worst:
                    for r in sorted(results, key=lambda r: -r.metrics.get("tpot", 0.0))[:args.worst]:
                        print("   worst TPOT:", r.request_id, {k: round(v, 3) for k, v in r.metrics.items()})
        finally:
            cluster.shutdown()
    ray.shutdown()
    for mode in args.migration:
        mine = [r for r in rows if r["migration"] == mode]
        print(mode, {k: statistics.median(r[k] for r in mine)
                     for k in ("ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "attainment", "preemptions")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--long", type=int, default=200)
    ap.add_argument("--short", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--migration", nargs="+", default=["off", "on"], choices=["off", "on", "growth"])
    ap.add_argument("--horizon", type=int, default=256, help="growth_horizon_tokens for 'growth'")
    ap.add_argument("--worst", type=int, default=0, help="print this many worst-TPOT requests per run")
    ap.add_argument("--ttft-ms", type=float, default=1000)
    ap.add_argument("--tpot-ms", type=float, default=100)
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
