"""The installed distribution exposes one package, `tandem`, and none of its folders' generic names.

Run in a fresh interpreter outside the checkout (cwd elsewhere, no PYTHONPATH), where the
repository root is not on sys.path: what a user who pip-installed tandem sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

GENERIC = ["engine", "cluster", "prefill", "decode", "transfer", "placement", "deploy", "benchmarks"]

PROBE = textwrap.dedent("""
    import importlib, json, sys
    import tandem
    light = not {"torch", "ray"} & set(sys.modules)
    from tandem import LLM, SamplingParams, Cluster, connect, Client
    resolved = {}
    for package in ("tandem", "tandem.engine", "tandem.cluster"):
        module = importlib.import_module(package)
        resolved[package] = {name: getattr(module, name).__module__ for name in module.__all__}
    generic = []
    for name in %r:
        try:
            importlib.import_module(name)
            generic.append(name)
        except ImportError:
            pass
    stray = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print(json.dumps({"light": light, "resolved": resolved, "generic": generic, "stray": stray}))
""") % (GENERIC, GENERIC)


def _probe(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_only_the_tandem_namespace_is_importable_outside_the_checkout(tmp_path):
    result = _probe(tmp_path)
    assert result["light"], "`import tandem` must pull in neither torch nor Ray"
    assert result["generic"] == [] and result["stray"] == []
    for package, names in result["resolved"].items():
        assert names and all(module.startswith("tandem.") for module in names.values()), (package, names)
    assert result["resolved"]["tandem"]["LLM"] == "tandem.engine.llm"
    assert result["resolved"]["tandem"]["connect"] == "tandem.cluster.launcher"
