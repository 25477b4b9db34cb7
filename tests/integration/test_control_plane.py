"""The control plane under load and faults: instance reports never wait behind clients' long polls,
a client's streams share one poll, a full router refuses with a named error, a router that dies is
restarted and serves again (the requests it held fail clearly and leave no block behind), and a
cluster can be shut down by name without its router."""
from __future__ import annotations

import asyncio

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import assert_all_blocks_free, wait_until
from tests.integration.test_cluster import _instance_stats, _launch, _pause

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ctl(ray_cluster, tiny_llama_dir):
    """2 prefill + 1 decode with the default router limits; the restart test comes last."""
    cluster = _launch("ctl", tiny_llama_dir, prefill=2, decode=1)
    yield cluster
    cluster.shutdown()


def _pause_one(cluster, name: str, paused: bool) -> None:
    import ray

    ray.get(cluster.actors[name].pause.remote(paused), timeout=30)


def test_step_reports_are_not_starved_by_many_waiting_polls(ctl):
    """More long polls than Ray's default actor concurrency (1,000) wait on one stuck request;
    another request must still be dispatched and reported through the router."""
    import ray

    client = ctl.client(timeout_s=30)
    _pause_one(ctl, "ctl-prefill-0", True)
    try:
        stuck = client.submit([7] * 40, GREEDY)  # ties go to prefill-0 by name: it stays queued
        assert ray.get(client.router.describe.remote(stuck))["prefill_instance"] == "ctl-prefill-0"
        polls = [client.router.poll.remote(stuck, 120.0) for _ in range(1100)]
        out = client.generate([9, 8, 7], GREEDY)  # before: its submit timed out behind the polls
        assert (out.finish_reason, len(out.token_ids)) == ("length", 6)
        assert client.abort(stuck)
        chunks = ray.get(polls, timeout=60)  # the abort wakes them all
        assert {c.finish_reason for c in chunks} == {"abort"}
    finally:
        _pause_one(ctl, "ctl-prefill-0", False)
    assert_all_blocks_free(ctl)


def test_a_clients_streams_share_one_mailbox(ctl):
    client = ctl.client(timeout_s=60)
    prompts = [[3 + i, 4, 5 + i % 7] for i in range(48)]
    expected = [o.token_ids for o in client.generate_batch(prompts, GREEDY)]

    async def stream_all():
        async def one(prompt):
            return [t async for chunk in client.astream(prompt, GREEDY) for t in chunk.token_ids]
        before = client.stats()["router"]["polls"]
        tokens = await asyncio.gather(*(one(p) for p in prompts))
        return tokens, client.stats()["router"]["polls"] - before

    tokens, polls = asyncio.run(stream_all())
    assert tokens == expected
    assert polls < len(prompts)  # one poll carries many streams' chunks (per-stream polls: >= 48)
    assert_all_blocks_free(ctl)


def test_an_async_stream_abandoned_early_is_aborted(ctl):
    client = ctl.client(timeout_s=60)

    async def first_chunk_only():
        stream = client.astream([11] * 20, LONG)
        async for _chunk in stream:
            break
        await stream.aclose()  # GeneratorExit inside astream() aborts the request

    asyncio.run(first_chunk_only())
    assert_all_blocks_free(ctl)
    wait_until(lambda: ctl.stats()["requests"] == 0)


def test_a_full_router_refuses_with_a_named_error(ray_cluster, tiny_llama_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.transfer.protocol import Overloaded

    group = InstanceGroup(1, EngineConfig(dtype="float32", num_blocks=64, block_size=16), num_cpus=0.5)
    cluster = Cluster.launch(LaunchConfig(name="full", model_dir=str(tiny_llama_dir), prefill=group,
                                          decode=group, max_requests=3), timeout_s=120)
    try:
        client = cluster.client(timeout_s=60)
        _pause(cluster, "prefill", True)
        held = [client.submit([5, 6, i], GREEDY) for i in range(3)]
        with pytest.raises(Overloaded, match=r"3 requests in flight.*router\.max_requests=3"):
            client.submit([5, 6, 7], GREEDY)
        assert client.abort(held[0])
        _pause(cluster, "prefill", False)
        assert client.generate([5, 6, 7], GREEDY).finish_reason == "length"  # room again
        assert [client.result(r).finish_reason for r in held[1:]] == ["length", "length"]
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_a_restarted_router_serves_again_and_frees_what_the_old_one_held(ctl):
    import ray

    from tandem.cluster.client import RouterLost

    client = ctl.client(timeout_s=60)
    before = client.generate([21, 22, 23], GREEDY).token_ids
    _pause(ctl, "decode", True)
    try:
        held = [client.submit([3] * 20, LONG) for _ in range(3)]
        wait_until(lambda: sum(s["running"] + s["pending_admissions"] for s in _instance_stats(ctl, "decode")) == 3)
        waiting = client.router.result.remote(held[0], 60.0)
        ray.kill(ctl.router, no_restart=False)  # the process dies; Ray restarts the actor
        with pytest.raises(RouterLost, match="router died"):
            client._get(waiting, 30.0)
        stats = wait_until(lambda: _answers(client), timeout_s=60)
        assert stats["router"]["restarted"] and stats["requests"] == 0
    finally:
        _pause(ctl, "decode", False)
    assert_all_blocks_free(ctl)  # the old router's requests were dropped on every instance
    with pytest.raises(KeyError, match="lost when the router restarted"):
        client.result(held[1])
    assert client.generate([21, 22, 23], GREEDY).token_ids == before
    assert len(client.stats()["instances"]) == 3


def _answers(client):
    from tandem.cluster.client import RouterLost, RequestTimeout

    try:
        stats = client.stats()
    except (RouterLost, RequestTimeout):
        return None
    return stats if len(stats["instances"]) == 3 else None


def test_shutdown_by_name_needs_no_router(ray_cluster, tiny_llama_dir):
    import ray

    from tandem.cluster.launcher import NAMESPACE, shutdown_by_name

    cluster = _launch("orphan", tiny_llama_dir, prefill=1, decode=1)
    ray.kill(cluster.router, no_restart=True)
    stopped = shutdown_by_name("orphan")
    assert {"orphan-decode-0", "orphan-prefill-0"} <= set(stopped)
    left = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith("orphan-")]
    groups = [g["name"] for g in ray.util.placement_group_table().values()
              if g["name"].startswith("orphan-") and g["state"] != "REMOVED"]
    assert (left, groups) == ([], [])
    with pytest.raises(LookupError, match="no tandem cluster named 'orphan'"):
        shutdown_by_name("orphan")
