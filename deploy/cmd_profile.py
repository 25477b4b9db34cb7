"""`tandem profile SPEC`: time the real engine over a grid of batch shapes, fit the planner's latency
forms (placement/calibrate.py) and write the calibration file `tandem plan` reads. The engine runs
on the spec's decode (or colocated) pool's device, so a cuda spec calibrates on its GPU. ``--shapes``
times tensor/pipeline-parallel instances too (local worker processes), one calibration entry per
(tp, pp), which the planner uses for those shapes in place of its analytic model.

With ``--served`` it times one launched prefill + decode pair through the router instead
(cluster/served_profile.py): slower to run, closer to what a deployment serves."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PREFILL_GRID = ((1, 32), (1, 128), (1, 512), (1, 1024), (4, 64), (4, 256), (8, 128), (16, 64), (2, 768))
DECODE_GRID = ((1, 64), (1, 512), (4, 128), (8, 256), (16, 128), (32, 64), (32, 384), (64, 128))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="time the engine and write a calibrated latency profile")
    p.add_argument("spec", help="cluster spec (its model, dtype and decode instance settings are used)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--threads", type=int, default=1, help="torch threads (match the instances)")
    p.add_argument("--shapes", nargs="+", default=["1x1"], metavar="TPxPP",
                   help="instance shapes to time, e.g. 1x1 2x1 1x2 (a parallel shape runs tp x pp local "
                        "worker processes of --threads threads each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--served", action="store_true",
                   help="time launched instances (1 prefill + 1 decode) on Ray, not a bare engine")
    p.add_argument("--address", help="with --served: Ray cluster address (default: $RAY_ADDRESS or local)")
    p.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    import torch

    from tandem.cluster.deployment import model_directory
    from tandem.deploy.cmd_serve import load_spec_or_fail
    from tandem.engine.engine import Engine, EngineConfig
    from tandem.engine.parallel import Parallelism
    from tandem.placement.calibrate import fit_profile, save_profile

    spec = load_spec_or_fail(args.spec)
    if args.served:
        return _profile_served(spec, args)
    shapes = [_shape(text) for text in args.shapes]
    torch.set_num_threads(args.threads)
    device = (spec.decode or spec.instances).device
    samples, dtype = [], None
    for tp, pp in shapes:
        config = EngineConfig(dtype=spec.model.dtype, device=device, num_blocks=8192,
                              parallelism=Parallelism(tp, pp))
        engine = Engine(model_directory(spec), config, workers=_local_workers(args.threads))
        try:
            samples += [*prefill_samples(engine, args.repeats, tp, pp), *decode_samples(engine, args.repeats, tp, pp)]
        finally:
            engine.close()
        dtype = str(engine.dtype)
    profile = fit_profile(samples, model=spec.model.name or spec.model.path or "",
                          hardware=_hardware(device, args.threads), dtype=dtype)
    save_profile(profile, Path(args.out))
    fits = "; ".join(f"tp={e.tp} pp={e.pp}: prefill rms {1000 * e.prefill.rms:.1f} ms, decode rms "
                     f"{1000 * e.decode.rms:.1f} ms" for e in profile.entries)
    print(f"wrote {args.out}: {len(samples)} samples; {fits}")
    return 0


def _hardware(device: str, threads: int) -> str:
    """What the calibration was measured on, as its file records it."""
    if device == "cpu":
        return f"cpu x{threads} threads"
    import torch

    return f"{device} {torch.cuda.get_device_name(torch.device(device))}"


def _shape(text: str) -> tuple[int, int]:
    from tandem.deploy.cli import CommandError

    tp, sep, pp = text.lower().partition("x")
    if not (sep and tp.isdigit() and pp.isdigit() and int(tp) >= 1 and int(pp) >= 1):
        raise CommandError(f"--shapes: {text!r} is not TPxPP (for example 2x1)")
    return int(tp), int(pp)


def _local_workers(threads: int):
    """A parallel shape's workers: local processes with the instances' thread count each."""
    from tandem.engine.process_group import ProcessWorkerGroup

    return lambda config: ProcessWorkerGroup(config, threads)


def _profile_served(spec, args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import LaunchError
    from tandem.cluster.spec_types import SpecError
    from tandem.deploy.cli import CommandError
    from tandem.deploy.ray_session import connect_ray
    from tandem.cluster.served_profile import profile_served
    from tandem.placement.calibrate import save_profile

    connect_ray(args.address)
    try:
        profile = profile_served(spec, repeats=args.repeats)
    except (SpecError, LaunchError, ValueError, TimeoutError) as exc:
        raise CommandError(f"served profile failed: {exc}") from exc
    save_profile(profile, Path(args.out))
    entry, slow = profile.entries[0], profile.interference
    print(f"wrote {args.out}: served 1P+1D probes; prefill rms {1000 * entry.prefill.rms:.1f} ms, "
          f"decode rms {1000 * entry.decode.rms:.1f} ms; on one node prefill runs "
          f"{100 * slow.prefill:.0f}% slower beside decode, decode {100 * slow.decode:.0f}% beside prefill; "
          f"router delay {1000 * (profile.router_delay_s or 0.0):.1f} ms per request")
    return 0


def _timed(engine, lengths: list[int], decode: bool, repeats: int) -> tuple[list[int], float]:
    """Median seconds of one prefill (or one decode step) over `lengths` requests (as run)."""
    from tandem.engine.params import SamplingParams

    vocab = engine.model_config.vocab_size
    lengths = [min(n, engine.max_model_len - 8) for n in lengths]  # small models: short contexts
    times = []
    for r in range(repeats):
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        ids = [engine.add_request([(7 * i + 13 * r + j) % (vocab - 10) + 5 for j in range(n)], params)
               for i, n in enumerate(lengths)]
        while decode and engine.stats()["waiting"]:
            engine.step()  # the prefill, in as many steps as the token budget needs
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        for rid in ids:
            engine.abort(rid)
    return lengths, statistics.median(times)


def prefill_samples(engine, repeats: int, tp: int = 1, pp: int = 1):
    from tandem.placement.calibrate import ProfileSample

    out = []
    for batch, length in PREFILL_GRID:
        lengths, seconds = _timed(engine, [length] * batch, False, repeats)
        out.append(ProfileSample("prefill", tp, pp, tuple(lengths), seconds))
    return out


def decode_samples(engine, repeats: int, tp: int = 1, pp: int = 1):
    from tandem.placement.calibrate import ProfileSample

    out = []
    for batch, context in DECODE_GRID:
        lengths, seconds = _timed(engine, [context] * batch, True, repeats)
        # The decode step runs with one more token of context than each prompt.
        out.append(ProfileSample("decode", tp, pp, tuple(n + 1 for n in lengths), seconds))
    return out

