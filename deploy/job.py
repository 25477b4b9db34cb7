"""Batch entrypoint for `ray job submit`: serve a spec, run a JSONL of prompts, stream the results.

    ray job submit --working-dir . -- python -m tandem.deploy.job SPEC --prompts in.jsonl --out /abs/out.jsonl

Each input line is {"prompt": str | [token ids], optional "id", and any SamplingParams fields};
each output line has the id, text, token ids, finish reason and metrics (TTFT, TPOT, ...), or the
id and the error of a request that failed. At most ``--max-in-flight`` requests are in flight; each
result is appended to ``--out`` as it finishes, and a rerun skips the ids already there, so a job
killed midway resumes where it stopped (``deploy/batch.py``). Progress goes to stderr: a bar on a
terminal, a line every few seconds in a job's log; a summary line ends the job.

Paths are this process's: Ray runs a job's entrypoint on the head node (unless the job asks for
entrypoint resources), in its unpacked copy of ``--working-dir``. A relative ``--out`` therefore
lands in that copy on the head node, not where the job was submitted from: pass an absolute path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

PARAM_FIELDS = set(("max_tokens temperature top_k top_p seed stop stop_token_ids ignore_eos top_logprobs "
                    "logprobs").split())
DEFAULT_MAX_IN_FLIGHT = 256


def read_prompts(path: Path):
    from tandem.deploy.batch import Row
    from tandem.engine.params import SamplingParams

    rows, lines = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            params = SamplingParams(**{k: v for k, v in row.items() if k in PARAM_FIELDS})
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise SystemExit(f"{path}:{number}: {exc}")
        if "prompt" not in row:
            raise SystemExit(f"{path}:{number}: missing field 'prompt'")
        rid = str(row.get("id", number))
        if rid in lines:  # a rerun finds finished requests by id: ids must be unique
            raise SystemExit(f"{path}:{number}: id {rid!r} repeats line {lines[rid]}")
        lines[rid] = number
        rows.append(Row(rid, row["prompt"], params))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.deploy.job", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                    help=f"requests in flight at once (default {DEFAULT_MAX_IN_FLIGHT})")
    ap.add_argument("--address", help="Ray address (default: the job's cluster)")
    args = ap.parse_args(argv)
    if args.max_in_flight < 1:
        ap.error("--max-in-flight must be at least 1")

    from tandem.cluster.launcher import Cluster, LaunchError
    from tandem.cluster.spec_types import SpecError
    from tandem.deploy.batch import run_batch
    from tandem.deploy.cli import CommandError
    from tandem.deploy.cmd_serve import load_spec_or_fail, plan_if_auto
    from tandem.deploy.ray_session import connect_ray

    try:
        spec = load_spec_or_fail(args.spec)
        rows = read_prompts(args.prompts)
        connect_ray(args.address)
        cluster = Cluster.from_spec(plan_if_auto(spec))
    except (CommandError, LaunchError, SpecError) as exc:
        raise SystemExit(f"deploy.job: error: {exc}") from None
    try:
        client = cluster.client()
        tally = asyncio.run(run_batch(client.agenerate, rows, args.out, args.max_in_flight))
    finally:
        cluster.shutdown()
    print(f"summary: {tally.summary()}")
    print(f"wrote {tally.done} completions to {args.out} ({tally.skipped} were there already)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
