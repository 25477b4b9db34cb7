"""The disaggregated cluster on a local Ray cluster, compared with the in-process engine."""
from __future__ import annotations

import asyncio

import pytest

from tandem.engine import LLM, SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.scheduler import SchedulerConfig
from tests.integration.conftest import assert_all_blocks_free, mixed_workload, wait_until

NUM_REQUESTS = 32


def _engine(num_blocks: int, **scheduler) -> EngineConfig:
    return EngineConfig(dtype="float32", num_blocks=num_blocks, block_size=16,
                        scheduler=SchedulerConfig(**scheduler))


def _launch(name, model_dir, *, mode="disaggregated", prefill=2, decode=2, prefill_blocks=64,
            decode_blocks=64, transfer_backend="ray", recompute_lost=False, migration=None, **scheduler):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig

    # Half a CPU each: every cluster of this module fits the 4-CPU test cluster at once.
    group = lambda n, blocks: InstanceGroup(n, _engine(blocks, **scheduler), num_cpus=0.5)
    config = LaunchConfig(
        name=name, model_dir=str(model_dir), mode=mode,
        prefill=group(prefill, prefill_blocks) if mode == "disaggregated" else None,
        decode=group(decode, decode_blocks), transfer_backend=transfer_backend, recompute_lost=recompute_lost,
        **({"migration": migration} if migration else {}))
    return Cluster.launch(config, timeout_s=120)


def node_pools(ray) -> set[str]:
    """Shared-memory KV pools of this Ray node's processes."""
    from tandem.transfer.shm_pool import PREFIX, SHM_DIR, pool_tag

    prefix = f"{PREFIX}-{pool_tag(ray.get_runtime_context().get_node_id())}-"
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)}


@pytest.fixture(scope="module")
def disagg(ray_cluster, tiny_llama_dir):
    cluster = _launch("disagg", tiny_llama_dir)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def colocated(ray_cluster, tiny_llama_dir):
    cluster = _launch("coloc", tiny_llama_dir, mode="colocated", decode=2, decode_blocks=64)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def workload():
    return mixed_workload(3, NUM_REQUESTS, 70, (4, 24))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, workload):
    prompts, params = workload
    return LLM(tiny_llama_dir, dtype="float32", num_blocks=256).generate(prompts, params)


async def _stream_all(client, prompts, params):
    async def one(prompt, p):
        tokens, chunks = [], 0
        async for chunk in client.astream(prompt, p):
            tokens.extend(chunk.token_ids)
            chunks += 1
            last = chunk
        return tokens, last, chunks
    return await asyncio.gather(*(one(pr, p) for pr, p in zip(prompts, params)))


@pytest.mark.parametrize("which", ["disagg", "colocated"])
def test_concurrent_streams_match_in_process_engine(request, which, workload, reference):
    cluster = request.getfixturevalue(which)
    prompts, params = workload
    results = asyncio.run(_stream_all(cluster.client(timeout_s=120), prompts, params))
    for (tokens, last, _), ref in zip(results, reference):
        assert tokens == ref.token_ids
        assert last.finish_reason == "length" and last.metrics["ttft"] > 0
    assert_all_blocks_free(cluster)


@pytest.mark.parametrize("backend", ["shm", "auto"])
def test_outputs_are_identical_under_each_backend(ray_cluster, tiny_llama_dir, backend, workload,
                                                  reference):
    # The `disagg` cluster covers backend "ray".
    before = node_pools(ray_cluster)
    cluster = _launch(f"xfer-{backend}", tiny_llama_dir, prefill=1, decode=1,
                      transfer_backend=backend)
    try:
        pools = node_pools(ray_cluster) - before
        assert len(pools) == 2  # both instances' caches live in shared memory
        prompts, params = workload
        results = asyncio.run(_stream_all(cluster.client(timeout_s=120), prompts, params))
        assert [tokens for tokens, _, _ in results] == [ref.token_ids for ref in reference]
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()
    assert not pools & node_pools(ray_cluster)  # unlinked when the instances shut down


def test_colocated_requests_move_queued_by_redispatch_and_running_by_recompute(colocated, workload,
                                                                              reference, tiny_llama_dir):
    """Llumnix's colocated moves: requests queued on a stalled instance are re-dispatched (they
    have no KV yet), a running one moves by recompute; outputs stay the in-process engine's
    (greedy and seeded sampling), and the router's estimates end empty (nothing leaks there)."""
    import ray

    client = colocated.client(timeout_s=120)
    a, b = "coloc-decode-0", "coloc-decode-1"
    describe = lambda rid: ray.get(client.router.describe.remote(rid), timeout=30)  # noqa: E731
    prompts, params = workload
    ray.get(colocated.actors[a].pause.remote(True), timeout=30)
    try:
        rids = [client.submit(p, sp) for p, sp in zip(prompts[:6], params[:6])]
        queued = [rid for rid in rids if describe(rid)["decode_instance"] == a]
        assert queued  # dispatch spreads them over both instances
        assert all(client.migrate(rid, b) == b for rid in queued)
    finally:
        ray.get(colocated.actors[a].pause.remote(False), timeout=30)
    long = SamplingParams(max_tokens=400, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    expected = LLM(tiny_llama_dir, dtype="float32").generate([prompts[6]], long)[0].token_ids
    running = client.submit(prompts[6], long)
    here = wait_until(lambda: (d := describe(running))["num_tokens"] >= 3 and d["decode_instance"])
    ray.get(colocated.actors[here].pause.remote(True), timeout=30)  # mid-stream until it has left
    try:
        there = b if here == a else a
        assert client.migrate(running, there, kind="recompute") == there
    finally:
        ray.get(colocated.actors[here].pause.remote(False), timeout=30)
    kinds = {rid: [m["kind"] for m in describe(rid)["migrations"]] for rid in [*queued, running]}
    assert kinds == {**{rid: ["redispatch"] for rid in queued}, running: ["recompute"]}
    outs = [client.result(rid) for rid in rids]
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:6]]
    assert client.result(running).token_ids == expected
    assert_all_blocks_free(colocated)
    wait_until(lambda: colocated.stats()["router"]["dispatch_estimates"] == 0)


def test_the_rebalancer_redispatches_the_queue_of_a_stalled_colocated_instance(ray_cluster, tiny_llama_dir,
                                                                              workload, reference):
    """With rebalancing on, requests queued on an instance that stopped stepping move by
    themselves to the one that is free, and all finish while the first is still stalled."""
    import ray

    from tandem.cluster.spec_types import MigrationSpec

    cluster = _launch("rebal-coloc", tiny_llama_dir, mode="colocated", decode=2,
                      migration=MigrationSpec(enabled=True, interval_s=0.1))
    stalled = "rebal-coloc-decode-0"
    try:
        ray.get(cluster.actors[stalled].pause.remote(True), timeout=30)
        client = cluster.client(timeout_s=120)
        prompts, params = workload
        rids = [client.submit(p, sp) for p, sp in zip(prompts[:8], params[:8])]
        outs = [client.result(rid) for rid in rids]  # none can finish on the stalled instance
        assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:8]]
        assert sum(o.metrics["num_migrations"] for o in outs) >= 1  # dispatch sent some there first
        ray.get(cluster.actors[stalled].pause.remote(False), timeout=30)
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_generate_batch_and_metrics(disagg, workload, reference):
    prompts, params = workload
    outs = disagg.client().generate_batch(prompts[:8], params[:8])
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:8]]
    m = outs[0].metrics
    assert m["prefill_end"] >= m["prefill_start"] >= 0
    assert m["transfer_end"] >= m["transfer_start"] and m["transfer_time"] >= 0
    assert m["num_output_tokens"] == len(outs[0].token_ids)
    assert_all_blocks_free(disagg)


def test_text_prompt_and_stop_string(disagg, tiny_llama_dir):
    # The tiny model's byte tokenizer: text in, text out, compared with the in-process engine.
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = LLM(tiny_llama_dir, dtype="float32").generate(["hello"], params)[0]
    out = disagg.client().generate("hello", params)
    assert out.token_ids == ref.token_ids and out.text == ref.text


def test_bad_request_fails_alone(disagg, workload, reference):
    prompts, params = workload
    client = disagg.client()
    good = [client.submit(p, sp) for p, sp in zip(prompts[:4], params[:4])]
    with pytest.raises(ValueError, match="context length"):
        client.submit([5] * 600, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="vocabulary"):
        client.submit([999999], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        client.submit([], SamplingParams(max_tokens=8))
    outs = [client.result(rid) for rid in good]
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference[:4]]
    assert_all_blocks_free(disagg)


def test_abort_while_decoding_frees_everything(disagg):
    client = disagg.client()
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    rids = [client.submit([7] * 50, params) for _ in range(4)]
    router = client.router
    import ray

    wait_until(lambda: ray.get(router.describe.remote(rids[0]))["num_tokens"] > 3, 60)
    for rid in rids:
        assert client.abort(rid)
    outs = [client.result(rid) for rid in rids]
    assert all(o.finish_reason == "abort" and len(o.token_ids) < 400 for o in outs)
    assert_all_blocks_free(disagg)


def test_abort_right_after_submit_frees_everything(disagg):
    client = disagg.client()
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    rids = [client.submit([9] * 60, params) for _ in range(12)]
    # Most are queued or being prefilled; on a loaded machine one may even have finished first,
    # in which case abort() says so and its result must be complete.
    aborted = {rid: client.abort(rid) for rid in rids}
    assert sum(aborted.values()) >= len(rids) // 2
    for rid in rids:
        out = client.result(rid)
        assert (out.finish_reason, len(out.token_ids) < 400) == (("abort", True) if aborted[rid] else ("length", False))
    assert_all_blocks_free(disagg)


def test_stream_consumer_that_stops_early_aborts(disagg):
    client = disagg.client()
    stream = client.stream([11] * 20, SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()  # GeneratorExit inside stream() aborts the request
    assert_all_blocks_free(disagg)


def _pause(cluster, role: str, paused: bool) -> None:
    import ray

    handles = [h for n, h in cluster.actors.items() if f"-{role}-" in n]
    ray.get([h.pause.remote(paused) for h in handles], timeout=30)


def _instance_stats(cluster, role: str) -> list[dict]:
    return [s for n, s in cluster.stats()["instances"].items() if f"-{role}-" in n]


def test_abort_while_queued_for_prefill(disagg):
    import ray

    client = disagg.client()
    _pause(disagg, "prefill", True)
    try:
        rid = client.submit([5] * 30, SamplingParams(max_tokens=8, temperature=0))
        wait_until(lambda: sum(s["waiting"] for s in _instance_stats(disagg, "prefill")) == 1)
        assert ray.get(client.router.describe.remote(rid))["stage"] == "prefill"
        assert client.abort(rid)
        wait_until(lambda: sum(s["waiting"] for s in _instance_stats(disagg, "prefill")) == 0)
    finally:
        _pause(disagg, "prefill", False)
    assert client.result(rid).finish_reason == "abort"
    assert_all_blocks_free(disagg)


def test_abort_during_kv_transfer(disagg):
    import ray

    client = disagg.client()
    _pause(disagg, "decode", True)  # admissions wait: the request sits between the two pools
    try:
        rid = client.submit([6] * 40, SamplingParams(max_tokens=8, temperature=0))
        wait_until(lambda: ray.get(client.router.describe.remote(rid))["stage"] == "transfer")
        wait_until(lambda: sum(s["pending_admissions"] for s in _instance_stats(disagg, "decode")) == 1)
        assert sum(s["held"] for s in _instance_stats(disagg, "prefill")) == 1
        assert client.abort(rid)
        wait_until(lambda: sum(s["held"] for s in _instance_stats(disagg, "prefill")) == 0)
        wait_until(lambda: sum(s["pending_admissions"] for s in _instance_stats(disagg, "decode")) == 0)
    finally:
        _pause(disagg, "decode", False)
    out = client.result(rid)
    assert out.finish_reason == "abort" and len(out.token_ids) == 1  # the first token was streamed
    assert_all_blocks_free(disagg)


def test_decode_backpressure_reaches_prefill_not_oom(disagg, reference, workload):
    prompts, params = workload
    client = disagg.client(timeout_s=120)
    _pause(disagg, "decode", True)
    try:
        rids = [client.submit([8] * 60, SamplingParams(max_tokens=4, temperature=0)) for _ in range(40)]
        # 60-token requests take 4 blocks: a 64-block prefill instance can hold 16 un-pulled
        # exports; the rest must wait in its queue instead of over-committing memory.
        wait_until(lambda: [(s["held"], s["waiting"]) for s in _instance_stats(disagg, "prefill")]
                   == [(16, 4), (16, 4)])
    finally:
        _pause(disagg, "decode", False)
    outs = [client.result(rid) for rid in rids]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 4 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 1  # same prompt, greedy: same tokens
    assert_all_blocks_free(disagg)
