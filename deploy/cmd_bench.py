"""`tandem bench URL`: load any OpenAI-compatible server at a list of rates and report, from the
client side, TTFT/TPOT/ITL percentiles, joint SLO attainment and goodput; writes the table, the
per-request timings (JSON) and plots (PNG) to ``--out``. The same arrivals and lengths (one seed)
go to every server measured, so tandem and vLLM are measured alike."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

import msgspec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="load an OpenAI-compatible server and report goodput")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the model name to send")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="requests/s, one run each")
    p.add_argument("--requests", type=int, default=60, help="requests per rate")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals' coefficient of variation")
    p.add_argument("--input-len", default="128:384", help="prompt tokens: N, or LOW:HIGH (uniform)")
    p.add_argument("--output-len", default="64:192", help="output tokens: N, or LOW:HIGH (uniform)")
    p.add_argument("--trace", type=Path, help='JSONL of {"input_len", "output_len"} (instead of the lengths)')
    p.add_argument("--max-len", type=int, default=4096, help="the server's context: prompt + output fit it")
    p.add_argument("--token-range", type=int, nargs=2, default=[100, 1000], metavar=("LOW", "HIGH"),
                   help="prompt token ids are drawn from [LOW, HIGH) (within the model's vocabulary)")
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results and plots")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from tandem.deploy.bench_load import run_rate
    from tandem.deploy.bench_report import Slo, summarize, table, write_plots
    from tandem.deploy.cli import CommandError
    from tandem.placement.workload import sample_base

    for needed in ("httpx", "matplotlib"):
        if importlib.util.find_spec(needed) is None:
            raise CommandError(f"tandem bench needs {needed}: pip install 'tandem[bench]'")
    workload = _workload(args)
    base = sample_base(workload, args.requests, args.seed, args.max_len)
    slo = Slo(args.ttft_ms / 1e3, args.tpot_ms / 1e3, args.attainment)
    runs, rows = {}, []
    for rate in args.rates:
        if rate <= 0:
            raise CommandError(f"--rates: {rate:g} is not a positive rate")
        timings = asyncio.run(run_rate(args.url, args.model, base.arrivals(rate), list(base.inputs),
                                       list(base.outputs), tuple(args.token_range), args.api_key, args.seed))
        runs[rate], row = timings, summarize(rate, timings, slo)
        rows.append(row)
        print(f"rate {rate:g} req/s: {row.requests - row.errors}/{row.requests} answered, "
              f"attainment {row.attainment:.1%}", flush=True)
        if row.errors == row.requests:
            first = next(t.error for t in timings if t.error)
            raise CommandError(f"every request at {rate:g} req/s failed; the first: {first}")
    text = table(rows, slo)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_bytes(msgspec.json.encode(
        {"slo": slo, "rows": rows, "requests": {str(rate): timings for rate, timings in runs.items()}}))
    plots = write_plots(runs, rows, slo, args.out)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'results.json'}, " + ", ".join(str(p) for p in plots))
    return 0


def _workload(args: argparse.Namespace):
    from tandem.deploy.cli import CommandError
    from tandem.placement.workload import Arrival, Workload, load_trace

    if args.arrival == "poisson" and args.cv != 1.0:
        raise CommandError("--cv: only gamma arrivals take a coefficient of variation")
    arrival = Arrival(process=args.arrival, cv=args.cv)
    if args.trace is not None:
        try:
            return Workload(arrival=arrival, rate=None, trace=load_trace(args.trace), trace_path=str(args.trace))
        except ValueError as exc:
            raise CommandError(f"--trace: {exc}") from None
    return Workload(arrival=arrival, rate=None, input_len=_length(args.input_len, "--input-len"),
                    output_len=_length(args.output_len, "--output-len"))


def _length(text: str, flag: str):
    from tandem.deploy.cli import CommandError
    from tandem.placement.workload import Fixed, Uniform

    low, sep, high = text.partition(":")
    if low.isdigit() and not sep and int(low) >= 1:
        return Fixed(value=int(low))
    if low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high):
        return Uniform(low=int(low), high=int(high))
    raise CommandError(f"{flag}: {text!r} is not N or LOW:HIGH (1 <= LOW <= HIGH)")
