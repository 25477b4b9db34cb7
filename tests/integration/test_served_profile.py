"""`tandem profile --served`: probes a launched prefill + decode pair and writes a calibration the
planner loads; the pair is gone afterwards."""
from __future__ import annotations

import textwrap

from tandem.cluster.spec import load_spec
from tandem.deploy.cli import main
from tandem.cluster.served_profile import profile_served, single_pair
from tandem.placement.calibrate import load_profile

SMALL_PROBES = ((24, 1, 20), (16, 4, 12), (20, 2, 40), (12, 3, 24))


def _spec(tmp_path, model_dir, mode="disaggregated"):
    path = tmp_path / f"{mode}.yaml"
    pools = ("instances: {replicas: 1, num_blocks: 128, num_cpus: 0.5}" if mode == "colocated" else
             "prefill: {replicas: 2, num_blocks: 128, num_cpus: 0.5}\n"
             "decode: {replicas: 1, num_blocks: 128, num_cpus: 0.5}")
    path.write_text(textwrap.dedent(f"""\
        name: profiled
        mode: {mode}
        model: {{path: {model_dir}, dtype: float32}}
        """) + pools + "\n")
    return path


def _actor_names(ray):
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def test_single_pair_keeps_pool_settings_with_one_replica(tiny_llama_dir, tmp_path):
    spec = load_spec(_spec(tmp_path, tiny_llama_dir))
    pair = single_pair(spec)
    assert (pair.prefill.replicas, pair.decode.replicas, pair.name) == (1, 1, "profiled-profile")
    assert pair.prefill.num_blocks == spec.prefill.num_blocks == 128


def test_served_profile_fits_both_phases_and_stops_the_pair(ray_cluster, tiny_llama_dir, tmp_path):
    before = _actor_names(ray_cluster)
    profile = profile_served(load_spec(_spec(tmp_path, tiny_llama_dir)), repeats=1,
                             probes=SMALL_PROBES, tokens=8, interference_shape=(4, 24, 40))
    entry = profile.entry(1, 1)
    # Every probe gives a single-prompt prefill sample, and its batch (queued at the paused prefill
    # instance, so prefilled as one batch however fast the model) a prefill and a decode sample.
    assert entry.decode.samples == len(SMALL_PROBES)
    assert entry.prefill.samples == len(SMALL_PROBES) + entry.decode.samples
    assert all(abs(c) < 10 for c in (*entry.prefill.coef, *entry.decode.coef))
    # Slowdowns are measured A/B on one host: never negative, and far from 10x.
    assert 0 <= profile.interference.prefill < 10 and 0 <= profile.interference.decode < 10
    # Router hops and step-loop wake-ups between actors on one host: milliseconds, not seconds.
    assert profile.router_delay_s is not None and 0 < profile.router_delay_s < 1
    assert _actor_names(ray_cluster) == before


def test_profile_served_cli_writes_a_loadable_file(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "served.json"
    assert main(["profile", str(_spec(tmp_path, tiny_llama_dir)), "--served", "--out", str(out),
                 "--repeats", "1"]) == 0
    assert "served 1P+1D" in capsys.readouterr().out
    written = load_profile(out)
    assert written.entry(1, 1).decode.rms >= 0 and written.interference is not None


def test_profile_served_refuses_a_colocated_spec(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    spec = _spec(tmp_path, tiny_llama_dir, mode="colocated")
    assert main(["profile", str(spec), "--served", "--out", str(tmp_path / "x.json")]) == 2
    assert "disaggregated" in capsys.readouterr().err
