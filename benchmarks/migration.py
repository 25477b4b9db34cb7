"""Live migration downtime versus sequence length, against recomputing the sequence.

    python -m benchmarks.migration                       # 128..3072 tokens, 3 repeats, both modes
    python -m benchmarks.migration --lengths 128 3072 --repeats 5 --modes precopy

A local Ray cluster (1 prefill + 2 decode instances, shm transport, one torch thread each) serves
a random-weight 155M Llama (fp32, context 4096). For each length, a request with a prompt of that
many tokens decodes on one instance beside a short "bystander" request; the target is migrated to
the other instance. Measured per migration:

- downtime: from the source pausing the request (the export's reply at the router) to the start of
  the destination's first step with it (the time its admission report carries);
- client gap: the longest wait between two of the request's tokens around the migration, as a
  client polling it sees it, next to its median token gap before (one decode step);
- total: from the migrate call to the commit (the router hearing of that first step; pre-copy
  stages included);
- bystander slowdown: the bystander's median token gap on the source during the pre-copy stages
  over its median before the migration;
- recompute: the time to prefill the same sequence on this cluster (a fresh request's TTFT), which a
  recompute-instead-of-copy policy would pay as downtime.

Modes: ``precopy`` (the default policy: up to 3 stages) and ``stop_and_copy`` (no stages), each on
its own cluster, one after the other, in the same run. Medians over the repeats, spread min..max.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def launch(model_dir: str, name: str, max_stages: int):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.cluster.spec_types import MigrationSpec
    from tandem.engine.engine import EngineConfig

    engine = EngineConfig(dtype="float32", num_blocks=320, block_size=16, max_model_len=4096)
    group = lambda n: InstanceGroup(n, engine, num_cpus=0.5, num_threads=1)  # noqa: E731
    config = LaunchConfig(name=name, model_dir=model_dir, prefill=group(1), decode=group(2),
                          transfer_backend="shm", migration=MigrationSpec(max_stages=max_stages))
    return Cluster.launch(config, timeout_s=300)


class Tokens(threading.Thread):
    """Polls one request's stream; ``times`` holds when each token reached the client."""

    def __init__(self, router, request_id: str) -> None:
        super().__init__(daemon=True)
        self.router, self.request_id, self.times = router, request_id, []

    def run(self) -> None:
        import ray

        while True:
            chunk = ray.get(self.router.poll.remote(self.request_id, 5.0), timeout=30)
            now = time.perf_counter()
            self.times += [now] * len(chunk.token_ids)
            if chunk.finished:
                return

    def gaps(self, start: float, end: float) -> list[float]:
        """Gaps between consecutive tokens that arrived in [start, end]."""
        inside = [t for t in self.times if start <= t <= end]
        return [b - a for a, b in zip(inside, inside[1:]) if b > a]


def describe(client, rid: str) -> dict:
    import ray

    return ray.get(client.router.describe.remote(rid), timeout=30)


def wait_for(predicate, timeout_s: float = 300.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout_s}s")
        time.sleep(0.01)
    return value


def decoding(client, rid: str, min_tokens: int) -> dict:
    return wait_for(lambda: (d := describe(client, rid))["stage"] == "decode" and not d["migrating"]
                    and d["num_tokens"] >= min_tokens and d, what=f"{rid} decoding")


def one_migration(cluster, client, length: int, seed: int) -> dict:
    """Migrate a ``length``-token request once; its measurements."""
    import random

    from tandem.engine.params import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=4000 - length, temperature=0, ignore_eos=True)
    target = client.submit([rng.randrange(10, 32000) for _ in range(length)], params)
    source = decoding(client, target, 1)["decode_instance"]
    dest = next(n for n in cluster.actors if "-decode-" in n and n != source)
    bystander = client.submit([rng.randrange(10, 32000) for _ in range(16)], params)
    if decoding(client, bystander, 1)["decode_instance"] != source:
        client.migrate(bystander, source)
    streams = {rid: Tokens(client.router, rid) for rid in (target, bystander)}
    for stream in streams.values():
        stream.start()
    decoding(client, target, 24)
    before = time.perf_counter()
    decoding(client, bystander, len(streams[bystander].times) + 12)
    start = time.perf_counter()
    client.migrate(target, dest)
    record = wait_for(lambda: describe(client, target)["migrations"], what="commit")[-1]
    decoding(client, target, describe(client, target)["num_tokens"] + 8)
    end = time.perf_counter()
    for rid in (target, bystander):
        client.abort(rid)
    pause = start + (record["pause"] - record["start"])  # router clock offsets -> ours
    step = statistics.median(streams[target].gaps(before - 30, start))
    bystander_before = statistics.median(streams[bystander].gaps(before, start))
    during = streams[bystander].gaps(start, pause) or [bystander_before]
    return {"downtime": record["downtime_s"], "total": record["commit"] - record["start"],
            "client_gap": max(streams[target].gaps(start, end)), "step": step,
            "stages": record["stages"], "precopied": record["precopied_blocks"], "blocks": record["blocks"],
            "bystander_slowdown": statistics.median(during) / bystander_before}


def recompute_time(client, length: int, seed: int) -> float:
    import random

    from tandem.engine.params import SamplingParams

    rng = random.Random(seed)
    start = time.perf_counter()
    client.generate([rng.randrange(10, 32000) for _ in range(length)],
                    SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return time.perf_counter() - start


def spread(values: list[float], scale: float = 1000.0, fmt: str = ".0f") -> str:
    med = statistics.median(values)
    return f"{med * scale:{fmt}} ({min(values) * scale:{fmt}}..{max(values) * scale:{fmt}})"


def main() -> None:
    import ray

    from benchmarks.engine_throughput import model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 3072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["precopy", "stop_and_copy"],
                        choices=["precopy", "stop_and_copy"])
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="tandem", log_to_driver=False)
    model = str(model_dir("llama155m", Path(tempfile.mkdtemp())))
    print("mode           length  downtime ms      client gap ms    step ms   total ms        "
          "stages  precopied/blocks  bystander x   recompute ms")
    for mode in args.modes:
        cluster = launch(model, f"migbench-{mode.replace('_', '')}", 3 if mode == "precopy" else 0)
        try:
            client = cluster.client(timeout_s=600)
            for length in args.lengths:
                runs = [one_migration(cluster, client, length, seed) for seed in range(args.repeats)]
                recompute = [recompute_time(client, length, 100 + seed) for seed in range(args.repeats)]
                col = lambda k: [r[k] for r in runs]  # noqa: E731
                print(f"{mode:14} {length:6}  {spread(col('downtime')):16} {spread(col('client_gap')):16} "
                      f"{statistics.median(col('step')) * 1000:7.0f}   {spread(col('total')):15} "
                      f"{statistics.median(col('stages')):6.0f}  "
                      f"{statistics.median(col('precopied')):5.0f}/{statistics.median(col('blocks')):<5.0f}      "
                      f"{spread(col('bystander_slowdown'), 1, '.2f'):14} {spread(recompute)}", flush=True)
        finally:
            cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
