"""`tandem demo`: a local Ray cluster serving the embedded SmolLM2 disaggregated, end to end."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tandem.deploy.cli import CommandError

SPEC = Path(__file__).parent / "specs" / "smollm2-cpu.yaml"
QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for writing readable Python.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the ocean.",
    "What is 12 times 7?",
    "Name three planets of the solar system.",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="serve SmolLM2 disaggregated on a local Ray cluster")
    demo.add_argument("--spec", default=str(SPEC), help="cluster spec (default: %(default)s)")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import Cluster, LaunchError
    from tandem.deploy.cmd_serve import load_spec_or_fail
    from tandem.deploy.ray_session import connect_ray
    from tandem.engine.params import SamplingParams
    from tandem.engine.prepare import prepare_model, render_chat

    model_dir = prepare_model("smollm2")
    spec = load_spec_or_fail(args.spec)
    connect_ray(num_cpus=4)
    print(f"starting {spec.name}: 1 prefill + 1 decode instance ...", flush=True)
    try:
        cluster = Cluster.from_spec(spec)
    except LaunchError as exc:
        raise CommandError(str(exc)) from exc
    try:
        client = cluster.client(timeout_s=300)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        prompts = [render_chat(model_dir, [{"role": "user", "content": q}]) for q in QUESTIONS]
        _stream_one(client, QUESTIONS[0], prompts[0], params)
        _table(client, prompts[1:], QUESTIONS[1:], params)
        free = {n: f"{s['free_blocks']}/{s['num_blocks']}" for n, s in client.stats()["instances"].items()}
        print(f"KV blocks free after the demo: {free}")
    finally:
        cluster.shutdown()
    return 0


def _stream_one(client, question: str, prompt: str, params) -> None:
    print(f"\n> {question}\n", flush=True)
    for chunk in client.stream(prompt, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    print("\n")


def _table(client, prompts: list[str], questions: tuple[str, ...], params) -> None:
    start = time.perf_counter()
    results = client.generate_batch(prompts, params)
    wall = time.perf_counter() - start
    print(f"{len(prompts)} concurrent chat requests in {wall:.1f} s\n")
    print(f"{'question':48} {'tokens':>6} {'TTFT ms':>8} {'TPOT ms':>8} {'KV xfer ms':>10}")
    for q, r in zip(questions, results):
        m = r.metrics or {}
        print(f"{q[:48]:48} {len(r.token_ids):>6} {1000 * m.get('ttft', 0):>8.0f} "
              f"{1000 * m.get('tpot', 0):>8.1f} {1000 * m.get('transfer_time', 0):>10.1f}")
    ttft = [r.metrics["ttft"] for r in results]
    tpot = [r.metrics["tpot"] for r in results if "tpot" in r.metrics]
    print(f"\nmedian TTFT {1000 * statistics.median(ttft):.0f} ms, median TPOT "
          f"{1000 * statistics.median(tpot):.1f} ms; first answer: {results[0].text[:120]!r}")
