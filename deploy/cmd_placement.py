"""`tandem plan SPEC` and `tandem simulate SPEC --rate R`: the placement optimizer's commands.

Both read a placement spec (YAML; see placement/problem.py and placement/examples/). `plan` searches
for the deployment with the best goodput per device and prints it with the runners-up and the
colocated baseline. `simulate` runs the discrete-event simulator at one arrival rate, either for the
plan the search picks or for a deployment given on the command line.
"""
from __future__ import annotations

import argparse
import sys

import msgspec

from deploy.cli import CommandError
from placement.candidates import (Shape, divisibility_error, kv_blocks, pack_high_affinity,
                                  required_kv_blocks)
from placement.evaluate import Deployment, Evaluator
from placement.plan import Plan, format_result
from placement.problem import Problem, SpecError, load_problem
from placement.search import PlacementError, search
from placement.sim_core import SimResult, SimulationError


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="choose prefill/decode instances for a placement spec")
    plan.add_argument("spec", help="placement spec (YAML)")
    plan.add_argument("--json", action="store_true", help="print the search result as JSON")
    plan.set_defaults(func=cmd_plan)

    sim = subparsers.add_parser("simulate", help="simulate a deployment at one arrival rate")
    sim.add_argument("spec", help="placement spec (YAML)")
    sim.add_argument("--rate", type=float, required=True, help="arrival rate, requests/s")
    sim.add_argument("--prefill", metavar="TP:PP:N", help="N prefill instances of (tp, pp)")
    sim.add_argument("--decode", metavar="TP:PP:N", help="N decode instances of (tp, pp)")
    sim.add_argument("--colocated", metavar="TP:PP:N", help="N colocated instances instead")
    sim.add_argument("--json", action="store_true", help="print per-request latencies as JSON")
    sim.set_defaults(func=cmd_simulate)


def _load(path: str) -> Problem:
    try:
        return load_problem(path)
    except SpecError as exc:
        raise CommandError(f"{path}: {exc}") from None


def _search(problem: Problem):  # type: ignore[no-untyped-def]
    try:
        return search(problem)
    except (PlacementError, SimulationError) as exc:
        raise CommandError(str(exc)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    result = _search(_load(args.spec))
    if args.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    else:
        print(format_result(result))
    return 0


def _parse_group(text: str, flag: str) -> tuple[Shape, int]:
    try:
        tp, pp, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise CommandError(f"{flag}: expected TP:PP:N (three integers), got {text!r}") from None
    if min(tp, pp, n) < 1:
        raise CommandError(f"{flag}: TP, PP and N must be >= 1")
    return Shape(tp, pp), n


def _check_shape(problem: Problem, shape: Shape, phase: str, flag: str) -> None:
    reason = divisibility_error(problem.model, shape.tp, shape.pp)
    if reason:
        raise CommandError(f"{flag}: {reason}")
    if shape.tp > problem.cluster.devices_per_node:
        raise CommandError(f"{flag}: tp={shape.tp} exceeds the {problem.cluster.devices_per_node} "
                           "devices of a node")
    have, need = kv_blocks(problem, shape), required_kv_blocks(problem, phase)  # type: ignore[arg-type]
    if have < need:
        raise CommandError(f"{flag}: a (tp={shape.tp}, pp={shape.pp}) instance holds {have} KV blocks "
                           f"after weights, the workload's longest {phase} request needs {need}")


def _manual(problem: Problem, args: argparse.Namespace) -> Deployment:
    groups = [_parse_group(text, flag) for text, flag in ((args.prefill, "--prefill"),
                                                           (args.decode, "--decode")) if text]
    if len(groups) != 2:
        raise CommandError("give both --prefill and --decode (or --colocated, or neither to "
                           "simulate the searched plan)")
    (p, n), (d, m) = groups
    _check_shape(problem, p, "prefill", "--prefill")
    _check_shape(problem, d, "decode", "--decode")
    placed = pack_high_affinity(problem.cluster, p, n, d, m)
    if placed is None:
        raise CommandError(f"{n} x {p.devices} prefill + {m} x {d.devices} decode devices do not fit "
                           f"on {problem.cluster.nodes} node(s) of {problem.cluster.devices_per_node}")
    return Deployment("manual", p, d, placed[0], placed[1])


def _from_plan(plan: Plan) -> Deployment:
    return Deployment(plan.algorithm, Shape(plan.prefill.tp, plan.prefill.pp),
                      Shape(plan.decode.tp, plan.decode.pp), plan.prefill.instances,
                      plan.decode.instances)


def _summary(label: str, r: SimResult) -> str:
    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"
    return (f"{label}\n  at {r.rate:g} req/s over {len(r.ttft)} measured requests: attainment "
            f"{r.attainment * 100:.1f}% (TTFT {r.ttft_attainment * 100:.1f}%, TPOT "
            f"{r.tpot_attainment * 100:.1f}%), {r.preemptions} preemptions\n"
            f"  TTFT mean/p50/p90/p99 ms: {ms(r.ttft_pct.mean)}/{ms(r.ttft_pct.p50)}/"
            f"{ms(r.ttft_pct.p90)}/{ms(r.ttft_pct.p99)}\n"
            f"  TPOT mean/p50/p90/p99 ms: {ms(r.tpot_pct.mean)}/{ms(r.tpot_pct.p50)}/"
            f"{ms(r.tpot_pct.p90)}/{ms(r.tpot_pct.p99)}")


def _describe(dep: Deployment) -> str:
    return (f"{len(dep.prefill_at)} prefill x (tp={dep.prefill.tp}, pp={dep.prefill.pp}) + "
            f"{len(dep.decode_at)} decode x (tp={dep.decode.tp}, pp={dep.decode.pp}) on {dep.devices} devices")


def _runs(problem: Problem, args: argparse.Namespace) -> list[tuple[str, SimResult]]:
    ev = Evaluator(problem)
    if args.colocated:
        if args.prefill or args.decode:
            raise CommandError("--colocated excludes --prefill/--decode")
        shape, n = _parse_group(args.colocated, "--colocated")
        _check_shape(problem, shape, "colocated", "--colocated")
        if n * shape.devices > problem.cluster.devices:
            raise CommandError(f"--colocated: {n * shape.devices} devices exceed the cluster's "
                               f"{problem.cluster.devices}")
        label = f"colocated: {n} x (tp={shape.tp}, pp={shape.pp})"
        return [(label, ev.simulate_colocated(shape, n, args.rate))]
    if args.prefill or args.decode:
        dep = _manual(problem, args)
        return [(f"disaggregated: {_describe(dep)}", ev.simulate(dep, args.rate))]
    result = _search(problem)
    dep = _from_plan(result.plan)
    runs = [(f"planned ({dep.algorithm}): {_describe(dep)}", ev.simulate(dep, args.rate))]
    if result.baseline is not None:
        b = result.baseline
        runs.append((f"colocated baseline: {b.replicas} x (tp={b.tp}, pp={b.pp})",
                     ev.simulate_colocated(Shape(b.tp, b.pp), b.replicas, args.rate)))
    return runs


def cmd_simulate(args: argparse.Namespace) -> int:
    if not args.rate > 0:
        raise CommandError("--rate: must be > 0")
    problem = _load(args.spec)
    try:
        runs = _runs(problem, args)
    except SimulationError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        payload = [{"deployment": label, "result": result} for label, result in runs]
        sys.stdout.buffer.write(msgspec.json.encode(payload) + b"\n")
    else:
        print("\n".join(_summary(label, result) for label, result in runs))
    return 0
