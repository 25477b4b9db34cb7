"""A served 1 prefill + 1 decode cluster on one GPU, each instance holding half of it, against the
in-process engine on the same GPU: outputs must be identical, and every KV block free afterwards.

    python -m benchmarks.gpu_served --device cuda --transfer cuda_ipc --out $OUT/served.json
    python -m benchmarks.gpu_served --device cpu                           # the same path on CPU

A random-weight Llama with SmolLM2's shapes (4 layers, so it loads in seconds), fp32, greedy, 16
prompts of 32..160 tokens, 48 tokens out, KV moved through ``--transfer`` (``ray``: host memory
and the object store; ``cuda_ipc``: GPU to GPU). Reports whether the outputs matched, the
client-side TTFT/TPOT medians, and the instances' free blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(workdir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = workdir / "served-llama"
    LlamaForCausalLM(LlamaConfig(**SHAPES)).save_pretrained(path)
    return path


def launch(model_dir: Path, device: str, transfer: str):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig

    engine = EngineConfig(dtype="float32", device=device, num_blocks=512, block_size=16)
    share = 0.5 if device != "cpu" else 0.0
    group = InstanceGroup(1, engine, num_cpus=1, num_gpus=share)
    config = LaunchConfig(name="gpu-served", model_dir=str(model_dir), prefill=group, decode=group,
                          transfer_backend=transfer)
    return Cluster.launch(config, timeout_s=300)


def run(model_dir: Path, device: str, transfer: str) -> dict:
    import ray

    from tandem.engine import LLM, SamplingParams

    rng = random.Random(3)
    prompts = [[rng.randrange(10, SHAPES["vocab_size"]) for _ in range(rng.randint(32, 160))] for _ in range(16)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model_dir, dtype="float32", device=device, num_blocks=512)
                .generate(prompts, params)]
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="tandem", log_to_driver=False)
    cluster = launch(model_dir, device, transfer)
    try:
        client = cluster.client(timeout_s=300)
        start = time.perf_counter()
        outs = client.generate_batch(prompts, [params] * len(prompts))
        elapsed = time.perf_counter() - start
        free = wait_all_free(cluster, 10.0)  # acks of the last transfers travel after the last tokens
    finally:
        cluster.shutdown()
        ray.shutdown()
    return {"device": device, "transfer": transfer, "identical": [o.token_ids for o in outs] == expected,
            "mismatched": sum(o.token_ids != e for o, e in zip(outs, expected)),
            "errors": [o.error for o in outs if o.error][:3],
            "ttft_p50_ms": round(1000 * statistics.median(o.metrics["ttft"] for o in outs), 1),
            "tpot_p50_ms": round(1000 * statistics.median(o.metrics.get("tpot", 0.0) for o in outs), 2),
            "seconds": round(elapsed, 2), "all_blocks_free": free}


def wait_all_free(cluster, timeout_s: float) -> bool:
    """Whether every instance's blocks are free (and nothing held) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = cluster.stats()["instances"].values()
        if all(s.get("free_blocks") == s.get("num_blocks") and not s.get("held") for s in stats):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--transfer", default="ray", help="the KV transport: ray, auto, cuda_ipc (GPU), shm (CPU)")
    ap.add_argument("--out", help="also write the result (JSON) here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(build_model(Path(tmp)), args.device, args.transfer)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
