"""Clusters whose prefill and decode instances use different tensor/pipeline parallelism, on a
local Ray cluster: outputs against the single-worker engine (seeded sampling) and transformers
(greedy, up to near-ties that reordered sums may flip), every transport, every block back, and a
dead worker failing only its own instance's requests with a clear error."""
from __future__ import annotations

import asyncio

import pytest

from tandem.engine import LLM, SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.parallel import Parallelism
from tests.integration.conftest import assert_all_blocks_free, mixed_workload, wait_until
from tests.reference import assert_greedy_close, hf_load, make_tiny_model

NUM_REQUESTS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """3 layers (pp=2 splits them 2 + 1), 4 query heads and 2 KV heads. (A tp above the KV heads,
    which replicates them, is covered in process: tests/unit/test_parallel_engine.py for the model,
    tests/unit/test_resharding_transfer.py for the KV moves.)"""
    return make_tiny_model(tmp_path_factory.mktemp("parallel"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def workload():
    return mixed_workload(5, NUM_REQUESTS, 60, (4, 16))


@pytest.fixture(scope="module")
def reference(model_dir, workload):
    prompts, params = workload
    return hf_load(model_dir), LLM(model_dir, dtype="float32", num_blocks=256).generate(prompts, params)


def _launch(name, model_dir, prefill, decode, backend, decode_replicas=1, more_decode=()):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig

    def group(replicas, shape):
        engine = EngineConfig(dtype="float32", num_blocks=64, parallelism=Parallelism(*shape))
        return InstanceGroup(replicas, engine, num_cpus=0.5)  # per worker: fits the 4-CPU test cluster

    config = LaunchConfig(name=name, model_dir=str(model_dir), prefill=group(1, prefill),
                          decode=group(decode_replicas, decode), transfer_backend=backend,
                          health_timeout_s=5.0, more_decode=tuple(group(1, shape) for shape in more_decode))
    return Cluster.launch(config, timeout_s=180)


def _check_outputs(results, workload, reference):
    hf_model, wanted = reference
    prompts, params = workload
    for prompt, p, got, want in zip(prompts, params, results, wanted):
        assert got.error is None and got.finish_reason == "length", got.error
        if p.greedy:
            assert_greedy_close(hf_model, prompt, got.token_ids, want.token_ids)
        else:
            assert got.token_ids == want.token_ids


@pytest.mark.parametrize("prefill, decode, backend", [
    ((1, 1), (2, 1), "shm"),
    ((2, 1), (1, 1), "ray"),
    ((2, 1), (1, 2), "auto"),
    ((1, 2), (2, 1), "ray"),
    ((2, 2), (1, 1), "shm"),
], ids=["1x1-to-2x1-shm", "2x1-to-1x1-ray", "2x1-to-1x2-auto", "1x2-to-2x1-ray", "2x2-to-1x1-shm"])
def test_outputs_match_the_references_for_each_pair_of_shapes(ray_cluster, model_dir, workload, reference,
                                                              prefill, decode, backend):
    cluster = _launch(f"par-{prefill[0]}{prefill[1]}-{decode[0]}{decode[1]}", model_dir, prefill, decode, backend)
    try:
        prompts, params = workload
        _check_outputs(cluster.client(timeout_s=120).generate_batch(prompts, params), workload, reference)
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_requests_migrate_between_decode_pools_of_different_shapes(ray_cluster, model_dir, workload, reference):
    """Decode pools tp=2 and pp=2 side by side: one request moves tp=2 -> pp=2 -> tp=2 (or the
    reverse), pre-copied each way through shm (the other transports move the same resharded
    slices: tests/unit/test_resharding_transfer.py), and its tokens still match transformers; a
    seeded one moved once matches the single-worker engine; every block is free afterwards."""
    cluster = _launch("par-mixed", model_dir, (1, 1), (2, 1), "shm", more_decode=[(1, 2)])
    try:
        client = cluster.client(timeout_s=120)
        prompts, _ = workload
        greedy = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)
        seeded = SamplingParams(max_tokens=160, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
        single = LLM(cluster.config.model_dir, dtype="float32", num_blocks=256)
        wanted = single.generate(prompts[:1], greedy) + single.generate(prompts[1:2], seeded)
        there_and_back, once = client.submit(prompts[0], greedy), client.submit(prompts[1], seeded)
        start = _when_decoding(client, there_and_back)["decode_instance"]
        middle = client.migrate(there_and_back)
        assert middle != start
        wait_until(lambda: len(_describe(client, there_and_back)["migrations"]) == 1)
        _when_decoding(client, there_and_back, min_tokens=20)
        assert client.migrate(there_and_back) == start
        _when_decoding(client, once)
        client.migrate(once)
        moves = wait_until(lambda: len(m := _describe(client, there_and_back)["migrations"]) == 2 and m)
        assert all(m["blocks"] >= 1 for m in moves)  # pre-copied each way, not recomputed
        wait_until(lambda: len(_describe(client, once)["migrations"]) == 1)
        results = [client.result(there_and_back), client.result(once)]
        hf_model, _ = reference
        assert results[0].error is None and results[1].error is None
        assert_greedy_close(hf_model, prompts[0], results[0].token_ids, wanted[0].token_ids)
        assert results[1].token_ids == wanted[1].token_ids
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def tp_decode_pool(ray_cluster, model_dir):
    """A tp=2 prefill instance (its exports held on both workers) and two tp=2 decode instances."""
    cluster = _launch("par-pool", model_dir, (2, 1), (2, 1), "shm", decode_replicas=2)
    yield cluster
    cluster.shutdown()


def test_requests_migrate_between_parallel_decode_instances(tp_decode_pool, workload, reference):
    client = tp_decode_pool.client(timeout_s=120)
    prompts, _ = workload
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    single = LLM(tp_decode_pool.config.model_dir, dtype="float32", num_blocks=256).generate(prompts[:2], long)
    rids = [client.submit(prompt, long) for prompt in prompts[:2]]
    for rid in rids:
        here = _when_decoding(client, rid)["decode_instance"]
        assert client.migrate(rid) != here
    for rid in rids:  # each move committed (pre-copied through the workers' transports)
        migrations = wait_until(lambda: _describe(client, rid)["migrations"])
        assert len(migrations) == 1 and migrations[0]["blocks"] >= 1
    results = [client.result(rid) for rid in rids]
    hf_model, _ = reference
    for prompt, got, want in zip(prompts, results, single):
        assert got.error is None
        assert_greedy_close(hf_model, prompt, got.token_ids, want.token_ids)
    assert_all_blocks_free(tp_decode_pool)


def test_an_abort_during_a_sharded_kv_transfer_releases_every_worker_and_block(tp_decode_pool):
    import ray

    client = tp_decode_pool.client(timeout_s=120)
    decode = [h for n, h in tp_decode_pool.actors.items() if "-decode-" in n]
    ray.get([h.pause.remote(True) for h in decode], timeout=30)  # admissions wait between the pools
    try:
        rid = client.submit([6] * 40, SamplingParams(max_tokens=8, temperature=0))
        wait_until(lambda: _describe(client, rid)["stage"] == "transfer")
        wait_until(lambda: sum(s["pending_admissions"] for s in _decode_stats(tp_decode_pool)) == 1)
        assert _prefill_stats(tp_decode_pool)["held"] == 1
        assert client.abort(rid)
        wait_until(lambda: _prefill_stats(tp_decode_pool)["held"] == 0)
        wait_until(lambda: sum(s["pending_admissions"] for s in _decode_stats(tp_decode_pool)) == 0)
    finally:
        ray.get([h.pause.remote(False) for h in decode], timeout=30)
    assert client.result(rid).finish_reason == "abort"
    assert_all_blocks_free(tp_decode_pool)


def test_a_killed_worker_fails_its_instances_requests_and_the_rest_keeps_serving(tp_decode_pool, workload):
    import ray

    client = tp_decode_pool.client(timeout_s=120)
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    prompts, _ = workload
    rids = [client.submit(prompt, long) for prompt in prompts]
    wait_until(lambda: all(s.get("running", 0) > 0 for s in _decode_stats(tp_decode_pool)), 60)
    ray.kill(ray.get_actor("par-pool-decode-0-worker-1"), no_restart=True)
    results = [client.result(rid) for rid in rids]
    failed = [r for r in results if r.error is not None]
    assert failed and len(failed) < len(results)
    for result in failed:
        assert "par-pool-decode-0" in result.error and "worker 1 of 2" in result.error, result.error
    for result in results:
        assert result.error is not None or len(result.token_ids) == 400
    # The other instance serves everything that comes next.
    after = client.generate_batch(prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert all(r.error is None and len(r.token_ids) == 8 for r in after)


def _describe(client, rid):
    import ray

    return ray.get(client.router.describe.remote(rid), timeout=30)


def _when_decoding(client, rid, min_tokens=3):
    return wait_until(lambda: (d := _describe(client, rid))["stage"] == "decode"
                      and not d["migrating"] and d["num_tokens"] >= min_tokens and d)


def _prefill_stats(cluster) -> dict:
    (stats,) = [s for name, s in cluster.stats()["instances"].items() if "-prefill-" in name]
    return stats


def _decode_stats(cluster) -> list[dict]:
    return [s for name, s in cluster.stats()["instances"].items() if "-decode-" in name]


def test_a_waiting_kv_fetch_on_a_worker_does_not_hold_up_its_steps(ray_cluster, model_dir):
    """A worker fetches KV beside its steps: with a fetch stuck on an object that is not there
    yet, a step still runs (a worker actor with one ``async`` method would run them in turn)."""
    import ray

    from tandem.engine.parallel import Parallelism
    from tandem.engine.step_inputs import StepInputs
    from tandem.engine.worker import WorkerConfig
    from tandem.transfer.actor import RayWorkerGroup
    from tandem.transfer.protocol import KVHandle, KVLayout

    @ray.remote
    class Gate:
        def __init__(self) -> None:
            self.opened = asyncio.Event()

        async def wait(self) -> None:
            await self.opened.wait()

        async def open(self) -> None:
            self.opened.set()

    config = WorkerConfig(model_dir=str(model_dir), dtype="float32", device="cpu", block_size=16,
                          num_blocks=8, max_model_len=512, parallelism=Parallelism(1, 1))
    group = RayWorkerGroup(config, ("ray",), num_cpus=0.5)
    gate = Gate.remote()
    try:
        layout = KVLayout(3, 16, 2, 16, "float32")
        stuck = KVHandle("ray", "stuck", 16, 1, layout, payload=[gate.wait.remote()])
        fetching = group.workers[0].fetch.remote("ray", stuck, [5], 60.0)
        logits = group.run(StepInputs("prefill", [5, 6, 7], [3], [[0]]))
        assert logits.shape == (1, 256)
        assert not ray.wait([fetching], timeout=0)[0]  # still waiting, beside the step
    finally:
        ray.get(gate.open.remote())
        group.close()
