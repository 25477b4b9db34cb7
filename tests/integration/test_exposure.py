"""A local Ray cluster that tandem starts: token-authenticated (a process without the token cannot
join), and Ray's token file readable by its owner only. Runs in a fresh interpreter with its own
HOME, so the token it makes is the test's own."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

STARTER = textwrap.dedent("""
    import os, stat, subprocess, sys
    from tandem.deploy.ray_session import connect_ray, token_file
    ray = connect_ray(num_cpus=1)
    print("token mode", oct(stat.S_IMODE(token_file().stat().st_mode)), flush=True)
    joiner = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined')"
    # Two connection attempts, not Ray's twenty (a second each): a refusal is final anyway.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, RAY_gcs_server_port_wait_time_s="2")
    out = subprocess.run([sys.executable, "-c", joiner, ray.get_runtime_context().gcs_address],
                         env=env, capture_output=True, text=True, timeout=120)
    print("wrong token", out.returncode, "joined" in out.stdout, "ConnectionError" in out.stderr, flush=True)
    ray.shutdown()
""")


def test_a_local_cluster_needs_its_token_and_keeps_it_private(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", STARTER], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token mode 0o600" in out.stdout
    assert "wrong token 1 False True" in out.stdout  # refused, with Ray's ConnectionError
