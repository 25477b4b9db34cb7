"""Dead actors: no hang, a clear error for the requests they held, nothing leaked on survivors."""
from __future__ import annotations

import re

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import wait_until
from tests.integration.test_cluster import _launch, _pause, node_pools
from tandem.transfer.shm_pool import SHM_DIR, pool_tag, sweep_orphans


def _survivors_free(cluster) -> bool:
    stats = cluster.stats()["instances"]
    return all(s.get("free_blocks") == s.get("num_blocks") and not s.get("held")
               and not s.get("pending_admissions") for s in stats.values() if "error" not in s)


@pytest.fixture
def fresh(ray_cluster, tiny_llama_dir, request):
    """A new cluster; its transfer backend is the test's indirect parameter ("ray" if none)."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name[-14:].lower()).strip("-")
    cluster = _launch(f"fail-{name}", tiny_llama_dir, transfer_backend=getattr(request, "param", "ray"))
    yield cluster
    cluster.shutdown()


def _kill(cluster, name_part: str) -> str:
    import ray

    name = next(n for n in cluster.actors if name_part in n)
    ray.kill(cluster.actors[name], no_restart=True)
    return name


def test_decode_instance_dies_mid_decode(fresh):
    import ray

    client = fresh.client(timeout_s=60)
    long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    rids = [client.submit([3] * 20, long) for _ in range(6)]
    wait_until(lambda: all(ray.get(client.router.describe.remote(r))["stage"] == "decode" for r in rids))
    victim = _kill(fresh, "-decode-0")
    on_victim = [r for r in rids if ray.get(client.router.describe.remote(r))["decode_instance"] == victim]
    outs = {r: client.result(r) for r in rids}  # bounded: result() has a timeout
    for rid, out in outs.items():
        if rid in on_victim:
            assert out.finish_reason == "error" and victim in out.error
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 300
    assert on_victim, "the dispatcher should have spread requests over both decode instances"
    after = client.generate([4] * 10, SamplingParams(max_tokens=5, temperature=0))
    assert after.finish_reason == "length"  # served by the survivor
    wait_until(lambda: _survivors_free(fresh))


def test_with_recompute_lost_the_requests_of_lost_instances_go_on_elsewhere(ray_cluster, tiny_llama_dir):
    """``router.recompute_lost``: a decode instance killed mid-decode and a prefill instance killed
    with queued requests lose no greedy or unseeded request: each goes on elsewhere, greedy ones
    with the tokens of an undisturbed run; a seeded one on the lost instance fails saying why."""
    import ray

    from tandem.engine import LLM

    cluster = _launch("fail-recover", tiny_llama_dir, recompute_lost=True)
    try:
        client = cluster.client(timeout_s=60)
        greedy = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        unseeded = SamplingParams(max_tokens=300, temperature=0.8, ignore_eos=True)
        seeded = SamplingParams(max_tokens=300, temperature=0.8, seed=1, ignore_eos=True)
        prompts = [[3 + i] * 20 for i in range(7)]
        params = [seeded, greedy, unseeded, greedy, greedy, unseeded, greedy]
        expected = LLM(tiny_llama_dir, dtype="float32").generate(prompts, params)
        rids = [client.submit(p, sp) for p, sp in zip(prompts, params)]
        where = lambda rid: ray.get(client.router.describe.remote(rid), timeout=30)  # noqa: E731
        wait_until(lambda: all(where(r)["stage"] == "decode" and where(r)["num_tokens"] >= 3 for r in rids))
        victim = _kill(cluster, where(rids[0])["decode_instance"])  # the seeded request's
        lost = [i for i, r in enumerate(rids) if where(r)["decode_instance"] == victim]
        assert params[0] is seeded and len(lost) >= 2  # the dispatcher spread them
        outs = [client.result(r) for r in rids]
        assert outs[0].finish_reason == "error" and victim in outs[0].error and "seeded" in outs[0].error
        for i in range(1, len(rids)):
            assert (outs[i].finish_reason, outs[i].error, len(outs[i].token_ids)) == ("length", None, 300)
            if params[i] is greedy:
                assert outs[i].token_ids == expected[i].token_ids
        assert [outs[i].metrics.get("num_recoveries", 0.0) for i in lost[1:]] == [1.0] * (len(lost) - 1)

        _pause(cluster, "prefill", True)
        short = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        queued = [client.submit([7 + i] * 30, short) for i in range(4)]
        victim = _kill(cluster, "-prefill-0")
        ray.get(cluster.actors[victim.replace("-0", "-1")].pause.remote(False), timeout=30)
        reference = LLM(tiny_llama_dir, dtype="float32").generate([[7 + i] * 30 for i in range(4)], short)
        assert [client.result(r).token_ids for r in queued] == [r.token_ids for r in reference]
        wait_until(lambda: _survivors_free(cluster))
    finally:
        cluster.shutdown()


def test_prefill_dies_with_queued_requests(fresh):
    import ray

    client = fresh.client(timeout_s=60)
    _pause(fresh, "prefill", True)
    rids = [client.submit([7] * 30, SamplingParams(max_tokens=4, temperature=0)) for _ in range(4)]
    victim = _kill(fresh, "-prefill-0")
    ray.get(fresh.actors[victim.replace("-0", "-1")].pause.remote(False), timeout=30)
    outs = [client.result(r) for r in rids]
    lost = [o for o in outs if o.finish_reason == "error"]
    assert lost and all(victim in o.error for o in lost)
    assert all(o.finish_reason == "length" for o in outs if o.finish_reason != "error")
    wait_until(lambda: _survivors_free(fresh))


def _owned_probe(actor):
    """A small object in the object store owned by ``actor``'s worker, as its KV exports are."""
    import numpy as np
    import ray

    # In a list: a bare ObjectRef returned from a task would be resolved, not handed over.
    (probe,) = ray.get(actor.__ray_call__.remote(lambda self: [ray.put(np.zeros(1 << 16, np.uint8))]),
                       timeout=30)
    return probe


def _owner_death_seen_by(reader, probe) -> bool:
    """Whether ``reader``'s worker now gets OwnerDiedError for ``probe``: Ray there has processed
    the owner's death, so every object of that owner is lost to it, the KV export included."""
    import ray

    def check(self, refs) -> bool:
        try:
            ray.get(refs[0], timeout=2)
        except ray.exceptions.OwnerDiedError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        return False

    return ray.get(reader.__ray_call__.remote(check, [probe]), timeout=30)


@pytest.mark.parametrize("fresh,kv_survives", [("ray", False), ("auto", True)], indirect=["fresh"])
def test_prefill_source_dies_during_transfer(fresh, kv_survives):
    """The source dies after exporting and before the decode side fetches. "ray": the KV is an
    object the source owns, lost with its owner (Ray's ownership model), so the request fails
    with the fetch's OwnerDiedError. "auto" on one node: the KV is in the source's shared-memory
    pool, which SIGKILL leaves behind with its export still live, so the request completes with
    the tokens an intact run gives. Either way promptly, the cluster keeps serving, nothing leaks.

    Timing: a fetch in the window between the owner's death and Ray handling it (about a second
    here) still finds the "ray" object in the node's store and succeeds, so decode resumes only
    once the decode worker that will fetch fails to read a probe with the same owner."""
    import ray

    pools_before = node_pools(ray)

    client = fresh.client(timeout_s=60)
    _pause(fresh, "decode", True)
    rid = client.submit([5] * 40, SamplingParams(max_tokens=8, temperature=0))
    wait_until(lambda: ray.get(client.router.describe.remote(rid))["stage"] == "transfer")
    where = ray.get(client.router.describe.remote(rid))
    source, dest = fresh.actors[where["prefill_instance"]], fresh.actors[where["decode_instance"]]
    probe = _owned_probe(source)
    _kill(fresh, where["prefill_instance"])
    wait_until(lambda: _owner_death_seen_by(dest, probe))
    _pause(fresh, "decode", False)
    out = client.result(rid)  # bounded: the client's timeout
    if kv_survives:
        ref = client.generate([5] * 40, SamplingParams(max_tokens=8, temperature=0))
        assert (out.finish_reason, out.error) == ("length", None)
        assert out.token_ids == ref.token_ids and len(out.token_ids) == 8
    else:
        assert out.finish_reason == "error"
        assert out.error.startswith(f"request {rid}: KV fetch failed (OwnerDiedError"), out.error
    ok = client.generate([6] * 10, SamplingParams(max_tokens=4, temperature=0))
    assert ok.finish_reason == "length"
    wait_until(lambda: _survivors_free(fresh))
    if fresh.config.transfer_backend == "auto":  # SIGKILL left the source's pool behind
        swept: list[str] = []
        wait_until(lambda: swept.extend(sweep_orphans(SHM_DIR, _tag(ray))) or swept)
        assert len(swept) == 1 and set(swept) == pools_before - node_pools(ray)  # the source's


def _tag(ray) -> str:
    return pool_tag(ray.get_runtime_context().get_node_id())
