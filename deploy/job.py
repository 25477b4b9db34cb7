"""Batch entrypoint for `ray job submit`: serve a spec, run a JSONL of prompts, write the results.

    ray job submit --working-dir . -- python -m tandem.deploy.job SPEC --prompts in.jsonl --out /abs/out.jsonl

Each input line is {"prompt": str | [token ids], optional "id", and any SamplingParams fields};
each output line has the id, text, token ids, finish reason and metrics (TTFT, TPOT, ...).

Paths are this process's: Ray runs a job's entrypoint on the head node (unless the job asks for
entrypoint resources), in its unpacked copy of ``--working-dir``. A relative ``--out`` therefore
lands in that copy on the head node, not where the job was submitted from: pass an absolute path.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

PARAM_FIELDS = set(("max_tokens temperature top_k top_p seed stop stop_token_ids ignore_eos "
                    "logprobs").split())


def read_prompts(path: Path):
    from tandem.engine.params import SamplingParams

    rows = []
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
        rows.append((str(row.get("id", number)), row["prompt"], params))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.deploy.job", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--address", help="Ray address (default: the job's cluster)")
    args = ap.parse_args(argv)

    from tandem.cluster.launcher import Cluster, LaunchError
    from tandem.cluster.spec_types import SpecError
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
        results = cluster.client().generate_batch([r[1] for r in rows], [r[2] for r in rows])
    finally:
        cluster.shutdown()
    with args.out.open("w") as out:
        for (rid, _, _), result in zip(rows, results):
            record = msgspec.to_builtins(result)
            record["id"] = rid
            out.write(json.dumps(record) + "\n")
    print(f"wrote {len(results)} completions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
