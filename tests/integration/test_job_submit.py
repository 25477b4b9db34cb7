"""`ray job submit ... python -m tandem.deploy.job SPEC` against a real local Ray head (`ray start --head`)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head started from this venv, so the job's `python` is ours; stopped whatever happens."""
    bindir = Path(sys.executable).parent
    temp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    ray = str(bindir / "ray")
    # Every port free, not Ray's defaults: another Ray on this host (a test cluster, a colleague's)
    # holding the agent's default port 52365 leaves the head without a job agent.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}",
                   f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    start = [ray, "start", "--head", "--num-cpus=4", "--disable-usage-stats", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
             *agent_ports]
    subprocess.run(start, env=env, check=True, timeout=120, capture_output=True)
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "ray": ray}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, timeout=120, capture_output=True)


def _submit(cmd: list[str], env: dict, attempts: int = 12) -> subprocess.CompletedProcess:
    """Submit, retrying (bounded) while the head's job agent is still starting: right after
    `ray start` the job server answers "No available agent to submit job" for a few seconds."""
    for _ in range(attempts):
        done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


def test_job_submit_runs_a_spec_end_to_end(ray_head, tiny_llama_dir, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: jobtest
        model: {{path: {tiny_llama_dir}, dtype: float32}}
        prefill: {{replicas: 1, num_blocks: 32}}
        decode: {{replicas: 1, num_blocks: 32}}
        """))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello", "max_tokens": 6, "temperature": 0}\n'
                       '{"id": "b", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.7, "seed": 1}\n')
    out = tmp_path / "out.jsonl"
    cmd = [ray_head["ray"], "job", "submit", "--address", ray_head["dashboard"],
           "--working-dir", str(REPO), "--", "python", "-m", "tandem.deploy.job", str(spec),
           "--prompts", str(prompts), "--out", str(out)]
    done = _submit(cmd, ray_head["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wrote 2 completions" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [len(r["token_ids"]) for r in rows] == [6, 4]
    assert all(r["finish_reason"] == "length" and r["metrics"]["ttft"] > 0 for r in rows)

