"""CLI deployment paths: a bad spec fails before any actor starts; serve --detach / status / shutdown."""
from __future__ import annotations

import textwrap
import time

import pytest

from tandem.deploy.cli import main
from tandem.engine import SamplingParams
from tests.integration.conftest import wait_until


def _spec(tmp_path, model_dir, name="clitest", decode_tp=1):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{path: {model_dir}, dtype: float32}}
        prefill: {{replicas: 1, num_blocks: 32, num_cpus: 0.5}}
        decode: {{replicas: 1, num_blocks: 32, num_cpus: 0.5, tp: {decode_tp}}}
        """))
    return path


def _named_actors(ray):
    return ray.util.list_named_actors(all_namespaces=True)


def test_bad_spec_fails_before_any_actor(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    before = _named_actors(ray_cluster)
    assert main(["serve", str(_spec(tmp_path, tiny_llama_dir, decode_tp=3))]) == 2
    err = capsys.readouterr().err
    assert "decode.tp" in err and "does not divide" in err
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: x\nmodel: {name: smollm2}\nprefil: {replicas: 1}\n")
    assert main(["serve", str(bad)]) == 2
    assert "prefil" in capsys.readouterr().err
    assert _named_actors(ray_cluster) == before


@pytest.mark.parametrize("body, named", [
    ("prefill: {replicas: 8, num_cpus: 1}\ndecode: {num_cpus: 1}\n",
     "prefill: 8 x 1 CPU + decode: 1 x 1 CPU = 9 CPU, but the Ray cluster has"),
    ("prefill: {num_cpus: 1000}\ndecode: {num_cpus: 1}\n", "prefill.num_cpus: each instance needs 1000 CPU"),
    ("prefill: {num_cpus: .inf}\ndecode: {}\n", "prefill.num_cpus: must be finite, got inf"),
    ("prefill: &p {num_cpus: 1}\ndecode: *p\n", "decode: YAML aliases (*name) are not supported"),
    ("prefill: {num_cpus: 0.5}\ndecode: {num_cpus: 0.5, num_blocks: 100000000}\n",
     "decode: each instance needs at least"),
    ("prefill: {num_cpus: 0.5, device: cuda}\ndecode: {num_cpus: 0.5}\n",
     "prefill.num_gpus: each instance needs 1 GPU, but the largest node of the Ray cluster has 0"),
], ids=["too-many-cpus", "bundle-too-big", "infinite", "alias", "too-much-kv", "no-gpu"])
def test_infeasible_specs_fail_at_once_with_nothing_started(ray_cluster, tiny_llama_dir, tmp_path, capsys,
                                                            body, named):
    path = tmp_path / "infeasible.yaml"
    path.write_text(f"name: infeasible\nmodel: {{path: {tiny_llama_dir}, dtype: float32}}\n{body}")
    before = _named_actors(ray_cluster)
    start = time.monotonic()
    assert main(["serve", str(path)]) == 2
    assert named in capsys.readouterr().err
    assert time.monotonic() - start < 30 and _named_actors(ray_cluster) == before


def test_serve_detached_status_connect_shutdown(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    from tandem import cluster

    assert main(["serve", str(_spec(tmp_path, tiny_llama_dir)), "--detach"]) == 0
    client = cluster.connect("clitest")
    out = client.generate([4, 5, 6], SamplingParams(max_tokens=5, temperature=0))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    capsys.readouterr()
    assert main(["status", "clitest"]) == 0
    status = capsys.readouterr().out
    assert "clitest-prefill-0" in status and "32/32" in status
    assert main(["shutdown", "clitest"]) == 0
    with pytest.raises(LookupError):
        cluster.connect("clitest")
    assert main(["status", "clitest"]) == 2


def _leftovers(ray, prefix: str) -> tuple[list, list]:
    actors = [a["name"] for a in _named_actors(ray) if a["name"].startswith(prefix)]
    groups = [g["name"] for g in ray.util.placement_group_table().values()
              if g["name"].startswith(prefix) and g["state"] != "REMOVED"]
    return actors, groups


def _config(name: str, model_dir):
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig

    group = InstanceGroup(1, EngineConfig(dtype="float32", num_blocks=16), num_cpus=0.5)
    return LaunchConfig(name=name, model_dir=str(model_dir), prefill=group, decode=group)


def test_a_failure_inside_the_actors_is_one_line_and_leaves_nothing(ray_cluster, tiny_llama_dir, tmp_path):
    import shutil

    from tandem.cluster.launcher import Cluster, LaunchError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # the engine fails loading it, in the actor
    with pytest.raises(LaunchError) as info:
        Cluster.launch(_config("broken", broken), timeout_s=120)
    message = str(info.value)
    assert message.startswith("cluster 'broken' failed to start: ") and "\n" not in message
    assert "Traceback" not in message and "safetensors" in message.lower()
    assert _leftovers(ray_cluster, "broken-") == ([], [])


def test_an_interrupted_launch_stops_what_it_started(ray_cluster, tiny_llama_dir, monkeypatch):
    from tandem.cluster.launcher import Cluster

    started = []
    real_start = Cluster._start

    def start_then_interrupt(self, *args, **kwargs):
        if started:
            raise KeyboardInterrupt  # Ctrl-C while the second instance is starting
        started.append(real_start(self, *args, **kwargs))
        return started[-1]

    monkeypatch.setattr(Cluster, "_start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Cluster.launch(_config("interrupted", tiny_llama_dir), timeout_s=120)
    assert len(started) == 1
    wait_until(lambda: _leftovers(ray_cluster, "interrupted-") == ([], []))
