"""Tensor/pipeline-parallel instances on this CPU: step times, the all-reduce's share, KV resharding.

    python -m benchmarks.parallel                  # every part, 3 repeats
    python -m benchmarks.parallel --parts engine transfer --repeats 5

A random-weight 155M Llama (8 layers, 16 heads, 4 KV heads of 64, fp32) throughout.

- engine: one prefill step (4 prompts x 256 tokens) and the median decode step (batch 8, context
  ~300; batch 64, context ~100) of ``LLM`` at tp=1 in process (1 and 2 torch threads) and at tp=2
  and pp=2 on two local worker processes of cores/2 threads each (gloo);
- pipeline: decode tokens/s (32 new tokens per request, batch 8 at context ~300 and batch 64 at
  ~100) of pp=2 on two local worker processes (1 thread each), its decode steps one at a time or
  pipelined (two batches with a step of each in flight, engine/pipeline.py), next to tp=1 in
  process on every core;
- allreduce: one gloo all-reduce between two processes of the shapes a step reduces (decode
  [8, 1024], prefill [1024, 1024]); and, inside each worker of a tp=2 pair running the model
  (1 thread each), the step time and the time spent in its all-reduces (waiting for the slower
  peer included), for the decode and prefill steps above;
- transfer: one request's KV (1024 tokens, 64 blocks) moved through the shared-memory transport,
  in this process, from a source of one parallelism to a destination of another
  (``transfer/sharded.py``): each destination worker's fetch time, and their sum;
- cluster: the KV-transfer time the router records per request (prefill done to decode admitted)
  on a local Ray cluster, 1 prefill + 1 decode instance, for (prefill tp -> decode tp) = 1->1,
  1->2, 2->1, shm transport, 8 prompts of 512 tokens.

Medians over the repeats, spread min..max.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

LLAMA_155M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)


def model_dir(workdir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = workdir / "llama155m"
    LlamaForCausalLM(LlamaConfig(**LLAMA_155M)).save_pretrained(path)
    return path


def spread(values: list[float], scale: float = 1e3) -> str:
    return f"{statistics.median(values) * scale:.1f} ({min(values) * scale:.1f}..{max(values) * scale:.1f})"


# -- engine -----------------------------------------------------------------------------------------

def _decode_step(engine, prompts: list[list[int]]) -> float:
    """Median decode step of ``prompts`` decoding together (their prefill not counted)."""
    from tandem.engine import SamplingParams

    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # their prefills
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(steps)


def engine_times(path: Path, tp: int, pp: int, threads: int, repeats: int) -> tuple[list[float], ...]:
    from tandem.engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    prefill_prompts = torch.randint(10, 32000, (4, 256), generator=gen).tolist()
    small = torch.randint(10, 32000, (8, 300), generator=gen).tolist()
    large = torch.randint(10, 32000, (64, 100), generator=gen).tolist()
    prefill, decode8, decode64 = [], [], []
    llm = LLM(path, tp=tp, pp=pp, num_blocks=1024)  # workers get cores / workers threads each
    try:
        engine = llm.engine
        for _ in range(repeats):
            for prompt in prefill_prompts:
                engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            start = time.perf_counter()
            engine.step()
            prefill.append(time.perf_counter() - start)
            while engine.has_unfinished():
                engine.step()
            decode8.append(_decode_step(engine, small))
            decode64.append(_decode_step(engine, large))
    finally:
        llm.close()
    return prefill, decode8, decode64


def run_engine(path: Path, repeats: int) -> list[str]:
    lines = ["| shape | workers x threads | prefill step 4 x 256 (ms) | decode step batch 8, context 300 (ms) "
             "| decode step batch 64, context 100 (ms) |", "|---|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for tp, pp, threads in [(1, 1, 1), (1, 1, cores), (2, 1, None), (1, 2, None)]:
        prefill, decode8, decode64 = engine_times(path, tp, pp, threads or 1, repeats)
        per_worker = threads or max(1, cores // (tp * pp))
        lines.append(f"| tp={tp} pp={pp} | {tp * pp} x {per_worker} | {spread(prefill)} | {spread(decode8)} "
                     f"| {spread(decode64)} |")
    return lines


# -- pipelined decoding ----------------------------------------------------------------------------

def _decode_rate(engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s of ``prompts`` decoding together, their prefills not counted."""
    from tandem.engine import SamplingParams

    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(d.token_ids) for d in engine.step())
    return tokens / (time.perf_counter() - start)


def pipeline_rates(path: Path, pp: int, threads: int, pipelined: bool, repeats: int) -> tuple[list, list]:
    from tandem.engine.engine import Engine, EngineConfig
    from tandem.engine.parallel import Parallelism

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(10, 32000, (8, 300), generator=gen).tolist()
    large = torch.randint(10, 32000, (64, 100), generator=gen).tolist()
    engine = Engine(path, EngineConfig(dtype="float32", num_blocks=1024, parallelism=Parallelism(1, pp),
                                       pipeline_decode=pipelined))
    try:
        rates = [(_decode_rate(engine, small, 32), _decode_rate(engine, large, 32)) for _ in range(repeats)]
    finally:
        engine.close()
    return [r[0] for r in rates], [r[1] for r in rates]


def run_pipeline(path: Path, repeats: int) -> list[str]:
    lines = ["| shape | decode steps | decode tok/s, batch 8, context 300 | decode tok/s, batch 64, context 100 |",
             "|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for pp, threads, pipelined in [(1, cores, False), (2, 1, False), (2, 1, True)]:
        small, large = pipeline_rates(path, pp, threads, pipelined, repeats)
        how = "2 batches in flight" if pipelined else ("one at a time" if pp > 1 else f"in process, {threads} threads")
        lines.append(f"| pp={pp} | {how} | {spread(small, 1)} | {spread(large, 1)} |")
    return lines


# -- all-reduce -------------------------------------------------------------------------------------

def _reduce_worker(rank: int, port: int, shapes, repeats: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    for shape in shapes:
        tensor = torch.randn(shape)
        for _ in range(5):
            dist.all_reduce(tensor)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        if rank == 0:
            out.put((shape, times))
    dist.destroy_process_group()


def _shard_step_worker(rank: int, port: int, path: str, repeats: int, out) -> None:
    from tandem.engine.collective import DistributedCollective
    from tandem.engine.parallel import Parallelism, WorkerShard
    from tandem.engine.step_inputs import StepInputs
    from tandem.engine.worker import ShardWorker, WorkerConfig

    torch.set_num_threads(1)
    config = WorkerConfig(model_dir=path, dtype="float32", device="cpu", block_size=16, num_blocks=512,
                          max_model_len=4096, parallelism=Parallelism(2, 1))
    comm = DistributedCollective(WorkerShard(config.parallelism, rank), f"tcp://127.0.0.1:{port}", 60)
    reduce = comm.all_reduce
    spent = [0.0]

    def timed(tensor):
        start = time.perf_counter()
        reduce(tensor)
        spent[0] += time.perf_counter() - start
        return tensor

    comm.all_reduce = timed
    worker = ShardWorker(config, rank, comm)
    steps = {
        "decode batch 8, context 300": StepInputs("decode", [5] * 8, [300] * 8,
                                                  [list(range(i * 20, i * 20 + 20)) for i in range(8)]),
        "prefill 4 x 256": StepInputs("prefill", [5] * 1024, [256] * 4,
                                      [list(range(i * 16, i * 16 + 16)) for i in range(4)]),
    }
    for name, inputs in steps.items():
        worker.run(inputs)
        times = []
        for _ in range(repeats):
            spent[0] = 0.0
            start = time.perf_counter()
            worker.run(inputs)
            times.append((time.perf_counter() - start, spent[0]))
        out.put((rank, name, times))
    comm.close()


def run_allreduce(path: Path, repeats: int) -> list[str]:
    lines = run_gloo_pair(repeats)
    import multiprocessing

    from tandem.engine.process_group import _free_port

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_shard_step_worker, args=(rank, port, str(path), 10 * repeats, out))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in range(4)]
    for proc in procs:
        proc.join(timeout=30)
    lines += ["", "| tp=2 worker (1 thread) | rank | step (ms) | in all-reduce (ms) | share |", "|---|---|---|---|---|"]
    for rank, name, times in sorted(results, key=lambda r: (r[1], r[0])):
        steps, reduces = [t for t, _ in times], [r for _, r in times]
        share = statistics.median(r / t for t, r in times)
        lines.append(f"| {name} | {rank} | {spread(steps)} | {spread(reduces)} | {share:.0%} |")
    return lines


def run_gloo_pair(repeats: int) -> list[str]:
    import multiprocessing

    from tandem.engine.process_group import _free_port

    shapes = [(8, 1024), (1024, 1024)]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_reduce_worker, args=(rank, port, shapes, 50 * repeats, out))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in shapes)
    for proc in procs:
        proc.join(timeout=30)
    lines = ["| all-reduce (gloo, 2 processes, fp32) | one call (ms) | per step: 2 x 8 layers (ms) |", "|---|---|---|"]
    for shape in shapes:
        times = results[shape]
        lines.append(f"| {list(shape)} | {spread(times)} | {statistics.median(times) * 16 * 1e3:.1f} |")
    return lines


# -- transfer ---------------------------------------------------------------------------------------

def transfer_times(src, dst, repeats: int) -> list[list[float]]:
    """Per destination worker, its fetch times over the repeats (shm, in this process)."""
    from tandem.engine.parallel import kv_head_range, layer_range
    from tandem.transfer.base import layout_of
    from tandem.transfer.sharded import fetch_shard, sharded_handle
    from tandem.transfer.shm import ShmTransport

    layers, kv_heads, blocks, block_size = 8, 4, 256, 16
    request = list(range(10, 74))  # 64 blocks: 1024 tokens

    def shard_shape(par, rank):
        tp_rank, pp_rank = par.coords(rank)
        return (len(layer_range(layers, par.pp, pp_rank)), 2, blocks, block_size,
                len(kv_head_range(kv_heads, par.tp, tp_rank)), 64)

    sources = [ShmTransport() for _ in range(src.world_size)]
    dests = [ShmTransport() for _ in range(dst.world_size)]
    try:
        src_caches = [t.allocate(shard_shape(src, r), torch.float32) for r, t in enumerate(sources)]
        for cache in src_caches:
            cache.normal_()
        dst_caches = [t.allocate(shard_shape(dst, r), torch.float32) for r, t in enumerate(dests)]
        handles = [t.export(c, "r", request, 1024) for t, c in zip(sources, src_caches)]
        whole = layout_of(torch.empty(layers, 2, blocks, block_size, kv_heads, 64))
        handle = handles[0] if src.world_size == 1 else sharded_handle(
            "shm", "r", 1024, len(request), whole, src, handles)
        target = list(range(100, 164))
        times = [[] for _ in dests]
        for _ in range(repeats + 1):
            for rank, (transport, cache) in enumerate(zip(dests, dst_caches)):
                start = time.perf_counter()
                fetch_shard(transport, handle, dst, rank, cache, target, 10.0)
                times[rank].append(time.perf_counter() - start)
        return [t[1:] for t in times]  # the first maps the source pools
    finally:
        for transport in sources + dests:
            transport.close()


def run_transfer(repeats: int) -> list[str]:
    from tandem.engine.parallel import Parallelism

    lines = ["| source -> destination | each destination worker's fetch (ms) | sum (ms) |", "|---|---|---|"]
    for src, dst in [((1, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (1, 1)), ((2, 1), (2, 1)),
                     ((1, 2), (2, 1)), ((1, 1), (1, 2))]:
        times = transfer_times(Parallelism(*src), Parallelism(*dst), repeats)
        sums = [sum(parts) for parts in zip(*times)]
        each = ", ".join(spread(t) for t in times)
        lines.append(f"| tp={src[0]} pp={src[1]} -> tp={dst[0]} pp={dst[1]} | {each} | {spread(sums)} |")
    return lines


# -- cluster ----------------------------------------------------------------------------------------

def run_cluster(path: Path, repeats: int) -> list[str]:
    import ray

    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine import SamplingParams
    from tandem.engine.engine import EngineConfig
    from tandem.engine.parallel import Parallelism

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, 32000, (8, 512), generator=gen).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    lines = ["| prefill tp -> decode tp | KV transfer per request, median of 8 (ms) | TTFT median (ms) |",
             "|---|---|---|"]
    try:
        for src, dst in [(1, 1), (1, 2), (2, 1)]:
            group = lambda tp: InstanceGroup(1, EngineConfig(dtype="float32", num_blocks=512, parallelism=Parallelism(tp, 1)),
                                             num_cpus=0.5)  # noqa: E731
            config = LaunchConfig(name=f"bench-par-{src}{dst}", model_dir=str(path), prefill=group(src),
                                  decode=group(dst), transfer_backend="shm")
            cluster = Cluster.launch(config, timeout_s=300)
            try:
                client = cluster.client(timeout_s=300)
                client.generate_batch(prompts[:2], params)  # warm up: first transfers map the pools
                xfer, ttft = [], []
                for _ in range(repeats):
                    results = [client.generate(p, params) for p in prompts]  # one at a time: no queueing
                    xfer.append(statistics.median(r.metrics["transfer_time"] for r in results))
                    ttft.append(statistics.median(r.metrics["ttft"] for r in results))
                lines.append(f"| {src} -> {dst} | {spread(xfer)} | {spread(ttft)} |")
            finally:
                cluster.shutdown()
    finally:
        ray.shutdown()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["engine", "pipeline", "allreduce", "transfer", "cluster"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp)) if {"engine", "pipeline", "allreduce", "cluster"} & set(args.parts) else None
        for part in args.parts:
            runner = {"engine": lambda: run_engine(path, args.repeats),
                      "pipeline": lambda: run_pipeline(path, args.repeats),
                      "allreduce": lambda: run_allreduce(path, args.repeats),
                      "transfer": lambda: run_transfer(args.repeats),
                      "cluster": lambda: run_cluster(path, args.repeats)}[part]
            print(f"\n## {part}\n")
            print("\n".join(runner()), flush=True)


if __name__ == "__main__":
    main()
