"""Placement search wall time and predicted goodput, DistServe's chatbot settings.

    python -m benchmarks.placement_search            # all six cases, markdown table on stdout
    python -m benchmarks.placement_search --cases opt-13b:4 --json

OPT-13B (TTFT 0.25 s, TPOT 0.1 s) and OPT-66B (TTFT 2.5 s, TPOT 0.15 s), 90% joint attainment, on
1, 2 and 4 nodes of 8 x A100-80GB. The workload approximates ShareGPT chat (lognormal prompts with
mean 300 tokens, outputs mean 250, clipped) with Poisson arrivals and no target rate, so every plan
fills its cluster: the largest joint simulations, hence the worst case for search time.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

from tandem.placement import problem_from_dict, search

SLOS = {"opt-13b": (250, 100), "opt-66b": (2500, 150)}
WORKLOAD = {
    "arrival": "poisson",
    "input_len": {"dist": "lognormal", "mean": 300, "sigma": 0.8, "min": 8, "max": 1536},
    "output_len": {"dist": "lognormal", "mean": 250, "sigma": 0.8, "min": 2, "max": 512},
}


def spec(model: str, nodes: int, prefill_budget: int | None = None) -> dict:
    ttft, tpot = SLOS[model]
    data = {"model": model, "dtype": "fp16", "hardware": "A100-80GB",
            "cluster": {"nodes": nodes, "devices_per_node": 8},
            "slo": {"ttft_ms": ttft, "tpot_ms": tpot, "attainment": 0.9}, "workload": WORKLOAD}
    if prefill_budget is not None:
        data["policy"] = {"prefill_token_budget": prefill_budget}
    return data


def run_case(model: str, nodes: int, prefill_budget: int | None = None) -> dict:
    problem = problem_from_dict(spec(model, nodes, prefill_budget))
    started = time.perf_counter()
    result = search(problem)
    seconds = time.perf_counter() - started
    plan, base = result.plan, result.baseline
    return {
        "model": model, "cluster": f"{nodes}x8", "seconds": round(seconds, 2),
        "simulations": result.simulations, "joint": result.joint_searches, "exact": result.exact,
        "algorithm": plan.algorithm,
        "prefill": f"{plan.prefill.replicas} x tp{plan.prefill.tp}/pp{plan.prefill.pp}",
        "decode": f"{plan.decode.replicas} x tp{plan.decode.tp}/pp{plan.decode.pp}",
        "devices": plan.devices, "goodput": round(plan.goodput, 2),
        "per_gpu": round(plan.goodput_per_device, 3),
        "baseline": f"{base.replicas} x tp{base.tp}/pp{base.pp}" if base else "-",
        "baseline_per_gpu": round(base.goodput_per_device, 3) if base else None,
        "ratio": round(plan.goodput_per_device / base.goodput_per_device, 2)
        if base and base.goodput_per_device > 0 else None,
    }


def markdown(rows: list[dict]) -> str:
    head = ("| model | cluster | search s | sims (joint) | optimal | algorithm | prefill | decode | GPUs "
            "| goodput req/s | req/s/GPU | colocated baseline | baseline req/s/GPU | ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cluster']} | {r['seconds']} | {r['simulations']} "
                     f"({r['joint']}) | {'yes' if r['exact'] else 'no'} | {r['algorithm']} | {r['prefill']} | {r['decode']} | {r['devices']} | "
                     f"{r['goodput']} | {r['per_gpu']} | {r['baseline']} | {r['baseline_per_gpu']} | "
                     f"{r['ratio']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[f"{m}:{n}" for m in SLOS for n in (1, 2, 4)],
                        help="MODEL:NODES pairs (default: both models on 1, 2, 4 nodes)")
    parser.add_argument("--prefill-budget", type=int, help="policy.prefill_token_budget "
                        "(default: the policy default, 4096 tokens)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        model, nodes = case.split(":")
        rows.append(run_case(model, int(nodes), args.prefill_budget))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"python {platform.python_version()} on {platform.machine()}")
        print(markdown(rows))


if __name__ == "__main__":
    main()
