"""placement: auto end to end: a cluster spec is planned against the running Ray cluster, launched
exactly as planned, and serves the same greedy tokens as the in-process engine."""
from __future__ import annotations

import random
import textwrap

from tandem.engine import LLM, SamplingParams
from tests.integration.conftest import assert_all_blocks_free


def _auto_spec(tmp_path, model_dir, name: str, ttft_ms: float = 2000) -> str:
    # No planning.cluster: the size comes from the Ray cluster (4 CPUs / num_cpus 1 = 4 devices).
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        placement: auto
        model: {{path: {model_dir}, dtype: float32}}
        prefill: {{num_blocks: 64, max_batch_tokens: 1024, max_num_seqs: 16, num_cpus: 1}}
        decode: {{num_blocks: 64, max_num_seqs: 32, num_cpus: 1}}
        slo: {{ttft_ms: {ttft_ms}, tpot_ms: 500, attainment: 0.9}}
        planning:
          workload:
            rate: 2
            input_len: {{dist: uniform, low: 4, high: 64}}
            output_len: {{dist: uniform, low: 4, high: 16}}
          search: {{requests: 60, max_requests: 400}}
        """))
    return str(path)


def _named_actors(ray):
    return ray.util.list_named_actors(all_namespaces=True)


def test_auto_spec_is_planned_launched_as_planned_and_serves(ray_cluster, tiny_llama_dir, tmp_path):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.spec import load_spec

    cluster = Cluster.from_spec(load_spec(_auto_spec(tmp_path, tiny_llama_dir, "autoplan")),
                                timeout_s=120)
    try:
        assert cluster.planned is not None
        plan, spec = cluster.planned.result.plan, cluster.planned.spec
        assert plan.cluster_devices == 4  # sized from the Ray cluster, not from this host
        for phase in (plan.prefill, plan.decode):
            assert (phase.tp, phase.pp) == (1, 1)
        names = list(cluster.actors)
        assert len([n for n in names if n.startswith("autoplan-prefill-")]) == plan.prefill.replicas
        assert len([n for n in names if n.startswith("autoplan-decode-")]) == plan.decode.replicas
        assert (spec.prefill.replicas, spec.decode.replicas) == (plan.prefill.replicas,
                                                                 plan.decode.replicas)
        # The pools' fixed fields reached the engines unchanged.
        decode_engine = cluster.config.decode.engine
        assert decode_engine.num_blocks == 64 and decode_engine.scheduler.max_num_seqs == 32
        assert cluster.config.prefill.engine.scheduler.max_num_batched_tokens == 1024
        assert set(cluster.stats()["instances"]) == set(names)

        rng = random.Random(5)
        prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 60))] for _ in range(8)]
        params = [SamplingParams(max_tokens=rng.randint(3, 12), temperature=0, ignore_eos=True)
                  for _ in prompts]
        outs = cluster.client(timeout_s=120).generate_batch(prompts, params)
        reference = LLM(tiny_llama_dir, dtype="float32", num_blocks=256).generate(prompts, params)
        assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_infeasible_auto_spec_fails_before_any_actor(ray_cluster, tiny_llama_dir, tmp_path, capsys):
    from tandem.deploy.cli import main

    before = _named_actors(ray_cluster)
    spec = _auto_spec(tmp_path, tiny_llama_dir, "noplan", ttft_ms=0.01)
    assert main(["serve", spec]) == 2
    err = capsys.readouterr().err
    assert "placement: auto placement found no feasible deployment" in err
    assert "SLO unreachable" in err and "TTFT 0.01 ms" in err
    assert _named_actors(ray_cluster) == before
