"""Chunked prefill in process: what a chunk costs, alone and beside running decodes.

    OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000 python -m benchmarks.chunked_prefill
    python -m benchmarks.chunked_prefill --threads 2 --repeats 7

SmolLM2-135M (prepared: `tandem models prepare smollm2`) in bf16, ``LLM`` in this process:
- prefill: one 256-token prompt with ``max_tokens=1``, whole (no chunking) and with step budgets of
  256, 128 and 64 tokens (one, two and four chunk steps);
- mixed: 7 requests decoding at ~200-260 tokens of context, then a 512-token prompt arrives; the
  median step time by step kind over the next 12 steps, for budgets of 8, 40, 72, 136 and 264
  tokens (7 decodes plus a chunk of 1, 33, 65, 129 or 257 tokens).

Medians over the repeats, spread min..max.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = list(range(100, 356))
BUDGETS = (8, 40, 72, 136, 264)


def _llm(**kwargs):
    from tandem.engine import LLM
    from tandem.engine.prepare import model_dir

    return LLM(model_dir("smollm2"), dtype="bfloat16", num_blocks=512, **kwargs)


def prefill_ms(budget: int | None, repeats: int) -> list[float]:
    from tandem.engine import SamplingParams

    chunking = {} if budget is None else dict(chunked_prefill=True, max_num_batched_tokens=budget,
                                              max_num_seqs=min(budget, 64))
    llm, params = _llm(**chunking), SamplingParams(max_tokens=1, temperature=0)
    llm.generate([PROMPT], params)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([PROMPT], params)
        times.append(1000 * (time.perf_counter() - start))
    return times


def mixed_ms(budget: int) -> dict[str, float]:
    from tandem.engine import SamplingParams
    from tandem.engine.sequence import Status

    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine = _llm(chunked_prefill=True, max_num_batched_tokens=budget, max_num_seqs=8).engine
    for i in range(7):
        engine.add_request(list(range(100 + i, 300 + i)), params)
    while engine.scheduler.waiting or any(s.status is not Status.RUNNING for s in engine.scheduler.running):
        engine.step()
    engine.add_request(list(range(50, 562)), params)
    kinds: dict[str, list[float]] = {}
    for _ in range(12):
        start = time.perf_counter()
        plan, _ = engine.run_step()
        kinds.setdefault(plan.kind, []).append(1000 * (time.perf_counter() - start))
    return {kind: statistics.median(v) for kind, v in kinds.items()}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; 256-token prompt, ms:")
    for budget in (None, 256, 128, 64):
        print(f"  {'whole' if budget is None else f'budget {budget}'}: {spread(prefill_ms(budget, args.repeats))}")
    print("7 decodes beside a 512-token prompt's chunks, median step ms by kind:")
    for budget in BUDGETS:
        steps = mixed_ms(budget)
        print(f"  budget {budget} (chunk {budget - 7}): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()
