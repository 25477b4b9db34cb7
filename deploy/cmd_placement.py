"""`tandem plan SPEC` and `tandem simulate SPEC --rate R`: the placement optimizer's commands.

Both read a placement spec (YAML; see placement/problem.py and placement/examples/) or a cluster spec
with `placement: auto` (deploy/specs/auto-placement.yaml; told apart by its `name:`/`placement:`
keys). `plan` searches for the deployment with the best goodput per device and prints it with the
runners-up and the colocated baseline; for a cluster spec, `--write-spec OUT` writes the explicit
spec that `tandem serve` launches. Without Ray, a cluster spec lacking `planning.cluster` is planned
for this host (one node, its CPUs divided by the pools' num_cpus). `simulate` runs the
discrete-event simulator at one arrival rate, either for the plan the search picks or for a
deployment given on the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import msgspec
import yaml

from tandem.deploy.cli import CommandError
from tandem.placement.candidates import (Shape, divisibility_error, kv_blocks, pack_high_affinity,
                                         required_kv_blocks)
from tandem.placement.evaluate import Deployment, Evaluator
from tandem.placement.plan import Plan, format_result
from tandem.placement.problem import Problem, SpecError, load_problem
from tandem.placement.search import PlacementError, search
from tandem.placement.sim_core import SimResult, SimulationError
from tandem.placement.yaml_safe import load_yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="choose prefill/decode instances for a placement spec "
                                              "or an auto cluster spec")
    plan.add_argument("spec", help="placement spec, or cluster spec with placement: auto (YAML)")
    plan.add_argument("--json", action="store_true", help="print the search result as JSON")
    plan.add_argument("--write-spec", metavar="OUT", type=Path,
                      help="write the planned cluster spec (explicit placement) for `tandem serve`")
    plan.set_defaults(func=cmd_plan)

    sim = subparsers.add_parser("simulate", help="simulate a deployment at one or more arrival rates")
    sim.add_argument("spec", help="placement spec, or cluster spec with placement: auto (YAML)")
    rate = sim.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="arrival rate, requests/s")
    rate.add_argument("--rates", type=float, nargs="+", help="several arrival rates, requests/s")
    sim.add_argument("--plot", metavar="DIR", type=Path,
                     help="write DIR/simulated_attainment.png: attainment against rate")
    sim.add_argument("--measured", metavar="RESULTS", type=Path,
                     help="with --plot: a `tandem bench` results.json, drawn on the same axes")
    sim.add_argument("--prefill", metavar="TP:PP:N", help="N prefill instances of (tp, pp)")
    sim.add_argument("--decode", metavar="TP:PP:N", help="N decode instances of (tp, pp)")
    sim.add_argument("--colocated", metavar="TP:PP:N", help="N colocated instances instead")
    sim.add_argument("--json", action="store_true", help="print per-request latencies as JSON")
    sim.set_defaults(func=cmd_simulate)


def _load(path: str) -> Problem:
    if is_cluster_spec(path):
        from tandem.cluster.autoplace import planning_problem

        spec = _load_cluster_spec(path)
        return _cluster_step(planning_problem, spec, _offline_size(spec))
    try:
        return load_problem(path)
    except SpecError as exc:
        raise CommandError(f"{path}: {exc}") from None


def is_cluster_spec(path: str) -> bool:
    """Cluster specs have a `name:` (and often `placement:`); placement specs have neither."""
    try:
        data = load_yaml(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False  # load_problem reports it
    return isinstance(data, dict) and ("name" in data or "placement" in data)


def _load_cluster_spec(path: str):  # type: ignore[no-untyped-def]
    from tandem.cluster.spec import load_spec
    from tandem.cluster.spec_types import SpecError as ClusterSpecError

    try:
        spec = load_spec(path)
    except ClusterSpecError as exc:
        raise CommandError(str(exc)) from None
    if spec.placement == "auto" and not spec.needs_planning:
        raise CommandError(f"{path}: nothing to plan: every pool pins replicas, tp and pp")
    return spec


def _offline_size(spec):  # type: ignore[no-untyped-def]
    from tandem.cluster.autoplace import host_cluster, needs_cluster_size

    return _cluster_step(host_cluster, spec) if needs_cluster_size(spec) else None


def _cluster_step(step, *args):  # type: ignore[no-untyped-def]
    """Run one cluster.autoplace step, its SpecError (which names the field) as a CommandError."""
    from tandem.cluster.spec_types import SpecError as ClusterSpecError

    try:
        return step(*args)
    except ClusterSpecError as exc:
        raise CommandError(str(exc)) from None


def _search(problem: Problem):  # type: ignore[no-untyped-def]
    try:
        return search(problem)
    except (PlacementError, SimulationError) as exc:
        raise CommandError(str(exc)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    planned = None
    if is_cluster_spec(args.spec):
        from tandem.cluster.autoplace import plan_spec

        spec = _load_cluster_spec(args.spec)
        planned = _cluster_step(plan_spec, spec, _offline_size(spec))
        result = planned.result
    elif args.write_spec is not None:
        raise CommandError("--write-spec: needs a cluster spec with placement: auto, not a "
                           "placement spec")
    else:
        result = _search(_load(args.spec))
    if args.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    else:
        print(format_result(result))
    if planned is not None and args.write_spec is not None:
        _write_spec(planned, args.spec, args.write_spec, sys.stderr if args.json else sys.stdout)
    return 0


def _write_spec(planned, source: str, out: Path, report) -> None:  # type: ignore[no-untyped-def]
    from tandem.cluster.autoplace import summary
    from tandem.cluster.spec import dump_spec

    line = summary(planned.spec.name, planned.result)
    header = f"# Written by `tandem plan {source}`:\n# {line}\n"
    try:
        out.write_text(header + dump_spec(planned.spec))
    except OSError as exc:
        raise CommandError(f"--write-spec: cannot write {out}: {exc.strerror or exc}") from None
    print(f"{line}\nwrote {out}", file=report)


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


def _runs(problem: Problem, args: argparse.Namespace) -> list[tuple[str, Callable[[float], SimResult]]]:
    """The deployments to simulate (given, or the searched plan and its colocated baseline),
    each with its simulation at a rate."""
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
        return [(label, lambda rate: ev.simulate_colocated(shape, n, rate))]
    if args.prefill or args.decode:
        dep = _manual(problem, args)
        return [(f"disaggregated: {_describe(dep)}", lambda rate: ev.simulate(dep, rate))]
    result = _search(problem)
    planned = _from_plan(result.plan)
    runs = [(f"planned ({planned.algorithm}): {_describe(planned)}", lambda rate: ev.simulate(planned, rate))]
    if result.baseline is not None:
        b = result.baseline
        runs.append((f"colocated baseline: {b.replicas} x (tp={b.tp}, pp={b.pp})",
                     lambda rate: ev.simulate_colocated(Shape(b.tp, b.pp), b.replicas, rate)))
    return runs


def cmd_simulate(args: argparse.Namespace) -> int:
    rates = args.rates or [args.rate]
    flag = "--rates" if args.rates else "--rate"
    if not all(r > 0 for r in rates):
        raise CommandError(f"{flag}: must be > 0")
    if args.measured and not args.plot:
        raise CommandError("--measured: needs --plot")
    measured = _measured(args.measured) if args.measured else {}
    problem = _load(args.spec)
    try:
        runs = [(rate, label, simulate(rate)) for label, simulate in _runs(problem, args) for rate in rates]
    except SimulationError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        payload = [{"deployment": label, "result": result} for _, label, result in runs]
        sys.stdout.buffer.write(msgspec.json.encode(payload) + b"\n")
    else:
        print("\n".join(_summary(label, result) for _, label, result in runs))
    if args.plot:
        from tandem.deploy.bench_report import attainment_plot

        curves: dict[str, list[tuple[float, float]]] = {}
        for rate, label, result in runs:
            curves.setdefault(label, []).append((rate, result.attainment))
        args.plot.mkdir(parents=True, exist_ok=True)
        path = attainment_plot(measured, curves, problem.slo.attainment, args.plot / "simulated_attainment.png")
        print(f"wrote {path}")
    return 0


def _measured(path: Path) -> dict[str, list[tuple[float, float]]]:
    """A `tandem bench` results.json's attainment per rate, as a curve named after its folder."""
    try:
        rows = msgspec.json.decode(path.read_bytes())["rows"]
        return {f"measured ({path.parent.name or path.name})": [(r["rate"], r["attainment"]) for r in rows]}
    except (OSError, msgspec.DecodeError, KeyError, TypeError) as exc:
        raise CommandError(f"--measured: {path} is not a `tandem bench` results.json ({exc})") from None
