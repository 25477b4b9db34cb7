"""Live migration between decode instances (pre-copy stages, then stop-and-copy of the rest):
requests moved mid-stream, some more than once (A -> B -> A), give exactly the tokens of a run
without migration (the in-process engine: greedy and seeded sampling), under the shm and ray
transports; a migration whose destination is lost before commit goes on at the source; an abort
mid-migration frees both sides; the rebalancer evens out a skewed load by itself; and every block
is free afterwards."""
from __future__ import annotations

import random
import time

import pytest

from tandem.engine import LLM, SamplingParams
from tests.integration.conftest import assert_all_blocks_free, wait_until

NUM = 8
A, B = "mig-{}-decode-0", "mig-{}-decode-1"


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(3, 40))] for _ in range(NUM)]
    params = [SamplingParams(max_tokens=96, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=96, temperature=0.8, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(NUM)]
    return prompts, params


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, workload):
    prompts, params = workload
    return [o.token_ids for o in LLM(tiny_llama_dir, dtype="float32", num_blocks=256).generate(prompts, params)]


def _launch(name: str, model_dir, backend: str = "ray", **router):
    """1 prefill + 2 decode; decode steps paced (25 ms) so requests are mid-stream when moved;
    blocks of 4 tokens so that most requests have full blocks to pre-copy."""
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.cluster.spec_types import MigrationSpec
    from tandem.engine.engine import EngineConfig
    from tandem.engine.pacing import StepPace

    pace = StepPace(prefill=(0.0, 0.0, 0.0), decode=(0.025, 0.0, 0.0))
    engine = EngineConfig(dtype="float32", num_blocks=384, block_size=4, step_pace=pace)
    group = lambda n: InstanceGroup(n, engine, num_cpus=0.5)  # noqa: E731
    router.setdefault("migration", MigrationSpec(min_stage_blocks=1))
    config = LaunchConfig(name=name, model_dir=str(model_dir), prefill=group(1), decode=group(2),
                          transfer_backend=backend, **router)
    return Cluster.launch(config, timeout_s=120)


@pytest.fixture(scope="module", params=["shm", "ray"])
def cluster(request, ray_cluster, tiny_llama_dir):
    launched = _launch(f"mig-{request.param}", tiny_llama_dir, request.param)
    launched.names = (A.format(request.param), B.format(request.param))
    yield launched
    launched.shutdown()


def _describe(client, rid):
    import ray

    return ray.get(client.router.describe.remote(rid), timeout=30)


def _move(client, rid, to):
    return client.migrate(rid, to)


def _when_decoding(client, rid, min_tokens=3):
    return wait_until(lambda: (d := _describe(client, rid))["stage"] == "decode"
                      and not d["migrating"] and d["num_tokens"] >= min_tokens and d)


def test_migrated_requests_match_a_run_without_migration(cluster, workload, reference):
    client = cluster.client(timeout_s=120)
    a, b = cluster.names
    prompts, params = workload
    rids = [client.submit(p, sp) for p, sp in zip(prompts, params)]
    moves = {rid: 0 for rid in rids}
    for i, rid in enumerate(rids):
        here = _when_decoding(client, rid)["decode_instance"]
        there = b if here == a else a
        assert _move(client, rid, there) == there
        moves[rid] += 1
        if i % 3 == 0:  # and back again: A -> B -> A
            _when_decoding(client, rid, min_tokens=_describe(client, rid)["num_tokens"] + 2)
            assert _move(client, rid, here) == here
            moves[rid] += 1
    for rid in rids:  # every move committed (none resumed at its source): in the request's lifetime
        wait_until(lambda: len(_describe(client, rid)["migrations"]) == moves[rid])
    assert sum(moves.values()) == NUM + 3
    lifetimes = [m for rid in rids for m in _describe(client, rid)["migrations"]]
    assert sum(m["stages"] >= 1 and m["precopied_blocks"] >= 1 for m in lifetimes) >= NUM // 2  # pre-copied
    assert all(0 <= m["downtime_s"] < 30 and m["blocks"] >= 1 for m in lifetimes)
    outs = [client.result(rid) for rid in rids]
    assert [(o.finish_reason, o.error) for o in outs] == [("length", None)] * NUM
    assert [o.token_ids for o in outs] == reference
    assert [o.metrics["num_migrations"] for o in outs] == [float(moves[rid]) for rid in rids]
    assert_all_blocks_free(cluster)


def test_32_streams_each_moved_at_least_once_match_a_run_without_migration(cluster, tiny_llama_dir):
    """32 concurrent streams; each is moved once it streams, a quarter twice (A -> B -> A) and an
    eighth three times, all from concurrent calls (several in and out of one instance at once)."""
    import asyncio

    import ray

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(3, 40))] for _ in range(32)]
    params = [SamplingParams(max_tokens=96, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=96, temperature=0.8, top_k=20, seed=7 + i, ignore_eos=True)
              for i in range(32)]
    expected = LLM(tiny_llama_dir, dtype="float32", num_blocks=512).generate(prompts, params)
    client = cluster.client(timeout_s=120)
    a, b = cluster.names

    async def hop(rid: str, hops: int) -> int:
        done = 0
        for _ in range(hops):
            deadline = time.monotonic() + 30
            while not ((d := await client.router.describe.remote(rid))["stage"] == "decode"
                       and not d["migrating"]):
                assert time.monotonic() < deadline, f"{rid} never decoding again: {d}"
                await asyncio.sleep(0.02)
            there = b if d["decode_instance"] == a else a
            assert await client.router.migrate.remote(rid, there) == there
            done += 1
        return done

    async def stream(i: int) -> tuple[list[int], int, str]:
        tokens, mover = [], None
        async for chunk in client.astream(prompts[i], params[i]):
            tokens += chunk.token_ids
            if mover is None and len(tokens) >= 3:
                mover = asyncio.ensure_future(hop(chunk.request_id, 3 if i % 8 == 1 else 2 if i % 4 == 0 else 1))
            reason = chunk.finish_reason
        return tokens, await mover, reason

    async def all_streams():
        return await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(32))), 300)

    results = asyncio.run(all_streams())
    assert [r[2] for r in results] == ["length"] * 32
    assert [r[0] for r in results] == [e.token_ids for e in expected]
    assert all(r[1] >= 1 for r in results) and sum(r[1] for r in results) == 20 + 8 * 2 + 4 * 3
    wait_until(lambda: ray.get(client.router.stats.remote(), timeout=30)["migrations"]["in_flight"] == 0)
    assert_all_blocks_free(cluster)


def test_a_migration_whose_destination_dies_goes_on_at_the_source(cluster, workload, reference):
    import ray

    client = cluster.client(timeout_s=120)
    prompts, params = workload
    rid = client.submit(prompts[1], params[1])
    source = _when_decoding(client, rid)["decode_instance"]
    dest = next(n for n in cluster.names if n != source)
    ray.get(cluster.actors[dest].pause.remote(True), timeout=30)  # its pull never starts
    assert _move(client, rid, dest) == dest
    assert _describe(client, rid)["migrating"]
    ray.kill(cluster.actors[dest], no_restart=True)
    out = client.result(rid)
    assert (out.finish_reason, out.error, out.token_ids) == ("length", None, reference[1])
    wait_until(lambda: dest not in cluster.stats()["instances"])
    assert_all_blocks_free(cluster)  # the survivors'


def test_an_abort_mid_migration_frees_both_sides(ray_cluster, tiny_llama_dir):
    import ray

    cluster = _launch("migabort", tiny_llama_dir)
    try:
        client = cluster.client(timeout_s=60)
        rid = client.submit([4, 5, 6, 7], SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        source = _when_decoding(client, rid)["decode_instance"]
        dest = next(n for n in cluster.actors if "-decode-" in n and n != source)
        ray.get(cluster.actors[dest].pause.remote(True), timeout=30)
        _move(client, rid, dest)
        stats = cluster.stats()["instances"]
        assert stats[source]["migrating_out"] == 1 and stats[dest]["pending_admissions"] == 1
        assert client.abort(rid)
        ray.get(cluster.actors[dest].pause.remote(False), timeout=30)
        assert client.result(rid).finish_reason == "abort"
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_a_request_that_is_not_decoding_is_not_moved(cluster):
    from tandem.cluster.migration import MigrationError

    client = cluster.client(timeout_s=60)
    rid = client.submit([9, 9, 9], SamplingParams(max_tokens=2, temperature=0))
    wait_until(lambda: _describe(client, rid)["stage"] == "done")
    with pytest.raises(MigrationError, match="is not decoding"):
        client.migrate(rid)
    assert client.result(rid).finish_reason == "length"


def test_a_drained_instance_empties_and_takes_no_new_requests(ray_cluster, tiny_llama_dir, workload, reference,
                                                              capsys):
    from tandem.deploy.cli import main

    cluster = _launch("drain", tiny_llama_dir)
    try:
        client = cluster.client(timeout_s=120)
        prompts, params = workload
        rids = [client.submit(p, sp) for p, sp in zip(prompts, params)]
        wait_until(lambda: {_describe(client, r)["decode_instance"] for r in rids}
                   == {"drain-decode-0", "drain-decode-1"})
        assert main(["drain", "drain", "drain-prefill-0"]) == 2  # not a decode instance: named error
        assert main(["drain", "drain", "drain-decode-0"]) == 0  # the CLI, on this Ray cluster
        assert {_describe(client, r)["decode_instance"] for r in rids} == {"drain-decode-1"}
        late = client.submit(prompts[0], params[0])  # new requests avoid the drained instance
        wait_until(lambda: _describe(client, late)["decode_instance"] == "drain-decode-1")
        outs = [client.result(r) for r in rids]
        assert [o.token_ids for o in outs] == reference  # identical to an undisturbed run
        moved = sum(o.metrics["num_migrations"] for o in outs)
        assert moved >= 1
        assert client.result(late).token_ids == reference[0]
        assert client.stats()["migrations"] == {"started": moved, "committed": moved, "resumed": 0,
                                                "cancelled": 0, "in_flight": 0, "rebalancing": False,
                                                "moves_planned": 0}
        capsys.readouterr()
        assert main(["status", "drain"]) == 0
        assert (f"0 in flight; {moved:g} committed, 0 resumed at their source and 0 given up in "
                "pre-copy") in capsys.readouterr().out
        assert cluster.stats()["instances"]["drain-decode-0"]["running"] == 0
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_the_rebalancer_evens_out_a_skewed_load_by_itself(ray_cluster, tiny_llama_dir, workload, reference):
    """Round-robin dispatch sends every long request to one instance and every short one to the
    other; the short ones finish, and the rebalancer moves long ones over, unasked."""
    from tandem.cluster.spec_types import MigrationSpec

    policy = MigrationSpec(enabled=True, interval_s=0.2, imbalance_threshold=4.0, min_stage_blocks=1)
    cluster = _launch("rebal", tiny_llama_dir, decode_policy="round_robin", migration=policy)
    try:
        client = cluster.client(timeout_s=120)
        prompts, params = workload
        long_ = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)
        short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        rids = []
        for prompt in prompts:  # one at a time, so round-robin alternates long and short
            rids.append(client.submit(prompt, long_))
            wait_until(lambda: _describe(client, rids[-1])["stage"] == "decode")
            rids.append(client.submit(prompt, short))
            wait_until(lambda: _describe(client, rids[-1])["stage"] in ("decode", "done"))
        outs = [client.result(rid) for rid in rids]
        expected = LLM(tiny_llama_dir, dtype="float32", num_blocks=1024).generate(
            [p for p in prompts for _ in (0, 1)], [long_, short] * NUM)
        assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
        moved = client.stats()["migrations"]
        assert moved["committed"] >= 2 and moved["rebalancing"], moved
        homes = {o.metrics["num_migrations"] > 0 for o in outs[0::2]}
        assert True in homes  # long requests moved
        assert_all_blocks_free(cluster)
    finally:
        cluster.shutdown()
