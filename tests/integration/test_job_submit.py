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
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "ray": ray, "address": f"127.0.0.1:{port}"}
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


def _spec(path: Path, name: str, model_dir: Path, num_blocks: int) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{path: {model_dir}, dtype: float32}}
        prefill: {{replicas: 1, num_blocks: {num_blocks}}}
        decode: {{replicas: 1, num_blocks: {num_blocks}}}
        """))
    return path


def test_job_submit_runs_a_spec_end_to_end(ray_head, tiny_llama_dir, tmp_path):
    spec = _spec(tmp_path / "job.yaml", "jobtest", tiny_llama_dir, 32)
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
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [len(r["token_ids"]) for r in rows] == [6, 4]
    assert all(r["finish_reason"] == "length" and r["metrics"]["ttft"] > 0 for r in rows)



def test_a_killed_job_resumes_with_only_the_missing_ids(ray_head, tiny_llama_dir, tmp_path):
    """500 prompts: results stream into the output while the job runs; killed midway, the job run
    again completes only the ids the output lacks."""
    spec = _spec(tmp_path / "resume.yaml", "jobresume", tiny_llama_dir, 64)
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": [5 + i % 200, 6, 7], "max_tokens": 3,
                                           "temperature": 0}) + "\n" for i in range(500)))
    out = tmp_path / "many-out.jsonl"
    cmd = [sys.executable, "-m", "tandem.deploy.job", str(spec), "--prompts", str(prompts), "--out", str(out),
           "--address", ray_head["address"], "--max-in-flight", "16"]
    job = subprocess.Popen(cmd, env=ray_head["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sizes = [_wait_lines(out, 50), _wait_lines(out, 120)]
    finally:
        job.kill()
        job.wait(timeout=60)
    assert sizes[0] < sizes[1] < 500  # the file grew while the job ran, and the kill came midway
    before = set()
    for line in out.read_text().splitlines():
        try:
            before.add(json.loads(line)["id"])
        except ValueError:  # the line the kill cut short: the rerun drops it and runs it again
            pass
    # Rerun under another cluster name: the killed job's actors may still be on their way out.
    _spec(spec, "jobresume2", tiny_llama_dir, 64)
    done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 500
    assert f"wrote {500 - len(before)} completions" in done.stdout and "summary: " in done.stdout
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 3 for r in rows)


def _wait_lines(path: Path, count: int, timeout_s: float = 240.0) -> int:
    """Lines in ``path`` once it has at least ``count`` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = len(path.read_text().splitlines()) if path.exists() else 0
        if lines >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout_s} s")
