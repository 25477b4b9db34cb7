"""Does the simulator predict the real cluster? Calibrated simulation vs a real 1P+1D run on CPU.

    python -m benchmarks.sim_vs_real                     # 3 repeats of 50 requests
    python -m benchmarks.sim_vs_real --repeats 1 --requests 30

Profiles the bare engine and the deployed instances (the probes of `tandem profile --served`),
sends Poisson arrivals to SmolLM2-135M served by 1 prefill + 1 decode actor, replays exactly those
arrivals and lengths in the simulator (placement/sim_disagg.py), and reports real vs simulated
TTFT/TPOT p50/p90 for each latency model. The method step by step, and the results:
benchmarks/RESULTS.md ("benchmarks/sim_vs_real.py (method)", "Simulator vs real cluster").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.sim_vs_real_config import BLOCK_SIZE, MAX_SEQS, NUM_BLOCKS, PREFILL_BUDGET, VOCAB
from benchmarks.sim_vs_real_costs import WithExport, engine_profile, measure_transfer, transfer_cost
# Cluster probes: cluster/served_profile.py's PROBES (batch x length within the 2048-token budget).


# -- cluster profile -----------------------------------------------------------------------------

async def probe_cluster(client, prefill, rng: random.Random, interference_passes: int) -> tuple[list, list, list]:
    """(prefill and router samples, decode samples, interference passes) of the deployed
    instances: the probes of `tandem profile --served` (cluster/served_profile.py), so this
    benchmark checks the product's calibration path. The decode instance is idle during the
    prefill probes (what was tried instead: benchmarks/RESULTS.md)."""
    from tandem.cluster.served_profile import PROBE_TOKENS, PROBES, probe, probe_interference

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, VOCAB) for _ in range(n)]

    samples = await probe(client, prefill, prompt, PROBES, PROBE_TOKENS)
    profile = cluster_profile(samples)
    ab = [await probe_interference(client, prefill, prompt, profile) for _ in range(interference_passes)]
    return ([s for s in samples if s.phase != "decode"], [s for s in samples if s.phase == "decode"], ab)


def cluster_profile(samples: list, interference_passes: list | None = None):
    """Fit the probes. Prefill batches above 1024 tokens (the lockstep batches of 8-16 prompts) lie
    outside what this workload's prefill batches reach; they are left out of the prefill form."""
    import msgspec

    from tandem.cluster.served_profile import fit_interference
    from tandem.placement.calibrate import fit_profile

    kept = [s for s in samples if s.phase == "decode" or sum(s.lengths) <= 1024]
    profile = fit_profile(kept, model="smollm2", hardware="cpu x1 thread, deployed 1P+1D", dtype="fp32")
    if not interference_passes:
        return profile
    return msgspec.structs.replace(profile, interference=fit_interference(interference_passes))


# -- workload and simulation ---------------------------------------------------------------------

def workload(n: int, rate: float, seed: int, vocab: int = VOCAB) -> list[tuple[float, list[int], int]]:
    """Poisson arrivals at ``rate``; prompts of 64..256 random token ids, outputs of 32..96 tokens."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(64, 256))]
        out.append((t, prompt, rng.randint(32, 96)))
    return out


def step_model(profile, model_dir: str, export: tuple[float, float]):
    from tandem.placement.calibrate import CalibratedLatency
    from tandem.placement.hardware import get_profile
    from tandem.placement.latency import AnalyticLatency
    from tandem.placement.model_spec import load_model

    fallback = AnalyticLatency(load_model(model_dir), get_profile("cpu"), "fp32", 1, 1)  # unused: both fitted
    return WithExport(CalibratedLatency(profile.entry(1, 1), fallback), export)


def simulate(step, transfer: tuple[float, float], arrivals, inputs, outputs, interference=None,
             router_delay: float = 0.0):
    from tandem.placement.policy import Policy
    from tandem.placement.sim_core import InstanceModel, Slo
    from tandem.placement.sim_disagg import DisaggSim
    from tandem.placement.workload import BaseTrace

    # The real decode admission takes blocks while any are free: no watermark.
    policy = Policy(prefill_token_budget=PREFILL_BUDGET, prefill_max_batch=MAX_SEQS,
                    decode_max_batch=MAX_SEQS, block_size=BLOCK_SIZE, watermark=0.0)
    trace = BaseTrace(times=tuple(arrivals), inputs=tuple(inputs), outputs=tuple(outputs))
    # Both instances run on this one host: with interference they slow each other down.
    sim = DisaggSim([InstanceModel(step, NUM_BLOCKS)], [InstanceModel(step, NUM_BLOCKS)],
                    [[transfer]], policy, trace, 1.0, interference=interference, shared_node=[[0]],
                    router_delay=router_delay)
    return sim.run(Slo(ttft_ms=1000, tpot_ms=75))


def saturation_rate(step, transfer, n: int = 200) -> float:
    """Completions/s of 1P+1D with every request of this workload queued at once."""
    reqs = workload(n, 1.0, seed=7)
    return simulate(step, transfer, [1e-6 * i for i in range(n)], [len(p) for _, p, _ in reqs],
                    [o for _, _, o in reqs]).throughput


# -- the real cluster ----------------------------------------------------------------------------

class CpuWatch:
    """Share of the host's CPU time used by processes outside this benchmark (its driver and every
    descendant: Ray's daemons, the router, the instances). The simulator gives each instance its
    own core; on a host shared with other jobs that stops being true, and this says how much."""

    def __init__(self) -> None:
        self.mark = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, dict[int, float]]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        me = psutil.Process()
        ours = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                c = proc.cpu_times()
                ours[proc.pid] = c.user + c.system
            except psutil.Error:
                pass
        return time.monotonic(), busy, ours

    def reset(self) -> None:
        self.mark = self._sample()

    def foreign(self) -> float:
        """Foreign share of all CPUs since the last reset (0..1)."""
        t0, busy0, ours0 = self.mark
        t1, busy1, ours1 = self._sample()
        ours = sum(c - ours0.get(pid, 0.0) for pid, c in ours1.items())
        return max(0.0, (busy1 - busy0 - ours) / ((os.cpu_count() or 1) * max(1e-6, t1 - t0)))

    async def wait_quiet(self, threshold: float, max_wait_s: float) -> float:
        """Wait (up to max_wait_s) for 3 s in which other jobs use < threshold of the CPUs."""
        deadline = time.monotonic() + max_wait_s
        while True:
            self.reset()
            await asyncio.sleep(3.0)
            share = self.foreign()
            if share < threshold or time.monotonic() > deadline:
                self.reset()
                return round(share, 3)


def start_ray() -> None:
    import ray

    for attempt in range(3):  # a busy shared host sometimes misses Ray's startup deadline
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(5)


def launch(model_dir: str, transport: str, step_pace=None):
    """1 prefill + 1 decode instance (one core, one torch thread each); ``step_pace``: an
    engine.pacing.StepPace for the instances' model steps (the test suite's check)."""
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.scheduler import SchedulerConfig

    scheduler = SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=PREFILL_BUDGET)
    engine = EngineConfig(dtype="float32", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, scheduler=scheduler,
                          step_pace=step_pace)
    group = InstanceGroup(1, engine, num_cpus=1, num_threads=1)
    return Cluster.launch(LaunchConfig(name="simvsreal", model_dir=model_dir, mode="disaggregated",
                                       prefill=group, decode=group, transfer_backend=transport),
                          timeout_s=300)


async def run_real(client, reqs) -> tuple[list[float], list]:
    """Drive the trace; returns each request's actual send time (s from start) and its Completion."""
    from tandem.engine.params import SamplingParams

    start = time.perf_counter()
    sent = [0.0] * len(reqs)

    async def one(i, at, prompt, out_len):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent[i] = time.perf_counter() - start
        return await client.agenerate(prompt, SamplingParams(max_tokens=out_len, temperature=0,
                                                             ignore_eos=True))
    results = await asyncio.gather(*(one(i, *r) for i, r in enumerate(reqs)))
    return sent, results


# -- comparison ----------------------------------------------------------------------------------

def rel(sim: float, real: float) -> float:
    return (sim - real) / real if real else float("nan")


def prefill_over_fit(results, profile) -> float:
    """Median over the real prefill batches of (measured duration / the profile's prediction)."""
    batches: dict[float, list[int]] = {}  # keyed by duration: equal to the microsecond within a batch
    for r in results:
        m = r.metrics
        key = round(m["prefill_end"] - m["prefill_start"], 6)
        batches.setdefault(key, []).append(len(r.prompt_token_ids))
    fit = profile.entry(1, 1).prefill
    ratios = [d / fit.at(sum(ls), sum(x * x for x in ls)) for d, ls in batches.items()]
    return round(statistics.median(ratios), 3)


def compare(results, sims: dict) -> dict:
    """Real vs each simulation: p50/p90 of TTFT and TPOT in ms, relative error of the simulation."""
    from tandem.placement.sim_core import percentiles

    real = {"ttft": percentiles([r.metrics["ttft"] for r in results]),
            "tpot": percentiles([r.metrics["tpot"] for r in results])}
    row: dict = {}
    for metric in ("ttft", "tpot"):
        for q in ("p50", "p90"):
            a = getattr(real[metric], q)
            cell = {"real_ms": round(1000 * a, 1)}
            for name, sim in sims.items():
                b = getattr(sim.ttft_pct if metric == "ttft" else sim.tpot_pct, q)
                cell[f"{name}_ms"], cell[f"{name}_err"] = round(1000 * b, 1), round(rel(b, a), 3)
            row[f"{metric}_{q}"] = cell
    return row


def describe(name: str, profile) -> str:
    e, slow = profile.entry(1, 1), profile.interference
    return json.dumps({"profile": name, "prefill_coef": [float(f"{c:.4g}") for c in e.prefill.coef],
                       "prefill_rms_ms": round(1000 * e.prefill.rms, 1),
                       "decode_coef": [float(f"{c:.4g}") for c in e.decode.coef],
                       "decode_rms_ms": round(1000 * e.decode.rms, 1),
                       "interference": None if slow is None else [round(slow.prefill, 3), round(slow.decode, 3)],
                       "router_delay_ms": None if profile.router_delay_s is None else round(1000 * profile.router_delay_s, 2)})


def print_table(rows: list[dict], name: str) -> None:
    print(f"\n{name} profile:\n")
    print("| metric | real ms: median (min..max) | sim ms: median (min..max) | error: median (min..max) |")
    print("|---|---|---|---|")
    for key in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        real = [r[key]["real_ms"] for r in rows]
        simv = [r[key][f"{name}_ms"] for r in rows]
        err = [100 * r[key][f"{name}_err"] for r in rows]
        print(f"| {key} | {statistics.median(real):.0f} ({min(real):.0f}..{max(real):.0f}) | "
              f"{statistics.median(simv):.0f} ({min(simv):.0f}..{max(simv):.0f}) | "
              f"{statistics.median(err):+.1f}% ({min(err):+.1f}%..{max(err):+.1f}%) |")


async def main_async(args) -> None:
    import ray

    from tandem.engine.prepare import prepare_model

    model_dir = str(prepare_model("smollm2"))
    t0 = time.perf_counter()
    print(f"load average at start: {[round(x, 2) for x in os.getloadavg()]}", flush=True)
    start_ray()
    watch = CpuWatch()
    quiet = await watch.wait_quiet(args.quiet, args.max_wait)
    engine = engine_profile(model_dir, args.calib_repeats)
    during = round(watch.foreign(), 3)
    print(describe("engine", engine), json.dumps({"foreign_cpu_before": quiet, "foreign_cpu_during": during}),
          flush=True)
    xfer = measure_transfer(model_dir)
    transfer = transfer_cost(xfer)
    cluster = launch(model_dir, args.transport)
    client = cluster.client(timeout_s=900)
    prefill = next(h for name, h in cluster.actors.items() if "-prefill-" in name)
    rows, rng = [], random.Random(4321)
    try:
        await run_real(client, workload(4, 4.0, seed=99))  # warm-up
        await watch.wait_quiet(args.quiet, args.max_wait)
        before = await probe_cluster(client, prefill, rng, args.interference_passes)
        probe_foreign = [round(watch.foreign(), 3)]
        first = cluster_profile(before[0] + before[1], before[2])
        capacity = saturation_rate(step_model(first, model_dir, xfer["export"]), transfer)
        rate = args.rate or round(args.load * capacity, 2)
        print(describe("cluster (first probes)", first), flush=True)
        print(json.dumps({"setup_s": round(time.perf_counter() - t0),
                          **{f"{k}_ms_fixed_us_per_token": [round(1000 * a, 2), round(1e6 * b, 2)]
                             for k, (a, b) in xfer.items()},
                          "sim_saturation_req_s": round(capacity, 2), "rate_req_s": rate}), flush=True)
        for k in range(args.repeats):
            reqs = workload(args.requests, rate, seed=args.seed + k)
            quiet = await watch.wait_quiet(args.quiet, args.max_wait)
            sent, results = await run_real(client, reqs)
            run_foreign = round(watch.foreign(), 3)
            watch.reset()
            after = await probe_cluster(client, prefill, rng, args.interference_passes)
            probe_foreign.append(round(watch.foreign(), 3))
            profile = cluster_profile(before[0] + after[0] + before[1] + after[1], before[2] + after[2])
            before = after
            if args.save_profiles:
                from tandem.placement.calibrate import save_profile
                save_profile(profile, f"{args.save_profiles}/cluster-repeat{k}.json")
            inputs, outputs = [len(p) for _, p, _ in reqs], [o for _, _, o in reqs]
            sims = {name: simulate(step_model(p, model_dir, xfer["export"]), transfer, sent, inputs, outputs,
                                   interference, p.router_delay_s or 0.0)
                    for name, p, interference in (("engine", engine, None), ("cluster", profile, None),
                                                  ("cluster_interference", profile, profile.interference))}
            foreign = {"before_run": quiet, "run": run_foreign, "probes_before_after": probe_foreign[-2:]}
            row = {"repeat": k, "seed": args.seed + k, "foreign_cpu": foreign,
                   **compare(results, sims),
                   "real_prefill_over_fit": {"engine": prefill_over_fit(results, engine),
                                             "cluster": prefill_over_fit(results, profile)}}
            print(describe(f"cluster (repeat {k})", profile), flush=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        cluster.shutdown()
        ray.shutdown()
    for name in ("engine", "cluster", "cluster_interference"):
        print_table(rows, name)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load", type=float, default=0.55, help="share of the simulated saturation rate")
    ap.add_argument("--rate", type=float, default=None, help="fixed rate (req/s) instead of --load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-repeats", type=int, default=2)
    ap.add_argument("--interference-passes", type=int, default=3,
                    help="A/B interference passes in each probe round (before and after every run)")
    ap.add_argument("--save-profiles", help="existing directory for each repeat's cluster profile")
    ap.add_argument("--transport", default="ray")
    ap.add_argument("--quiet", type=float, default=0.1,
                    help="start each phase once other jobs use less than this share of the CPUs")
    ap.add_argument("--max-wait", type=float, default=60.0, help="... or after this many seconds")
    args = ap.parse_args()
    # One event loop for the whole run: Ray binds awaited refs to the loop that first awaits.
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
