"""How long requests and their records live.

Time limits: the spec's router.request_timeout_s and Client(timeout_s), whichever ends first. A
timed-out request is aborted on every instance (blocks freed), finishes with finish_reason "error"
and a message naming the limit, and the client raises RequestTimeout. Decode steps are paced
(50 ms each), so a long request reliably outlives the limits while a short one does not.
Records: requests nobody reads, or aborted ones, leave no record in the router.
"""
from __future__ import annotations

import time

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import assert_all_blocks_free, wait_until
from tests.integration.test_cluster import _instance_stats, _pause

ROUTER_LIMIT_S = 3.0
RESULT_TTL_S = 1.0
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)  # ~20 s of paced steps
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def paced(ray_cluster, tiny_llama_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.pacing import StepPace

    pace = StepPace(prefill=(0.0, 0.0, 0.0), decode=(0.05, 0.0, 0.0))
    engine = EngineConfig(dtype="float32", num_blocks=64, block_size=16, step_pace=pace)
    group = InstanceGroup(1, engine, num_cpus=0.5)
    config = LaunchConfig(name="timeouts", model_dir=str(tiny_llama_dir), prefill=group, decode=group,
                          request_timeout_s=ROUTER_LIMIT_S, result_ttl_s=RESULT_TTL_S)
    cluster = Cluster.launch(config, timeout_s=120)
    yield cluster
    cluster.shutdown()


def _timed_out(call) -> tuple[str, float]:
    from tandem.cluster.client import RequestTimeout

    start = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        call()
    return str(info.value), time.monotonic() - start


def test_the_router_limit_ends_a_request_the_client_would_wait_for(paced):
    message, waited = _timed_out(lambda: paced.client(timeout_s=120).generate([3] * 20, LONG))
    assert "timed out" in message and f"router.request_timeout_s={ROUTER_LIMIT_S:g}s" in message
    assert ROUTER_LIMIT_S <= waited < ROUTER_LIMIT_S + 10
    assert_all_blocks_free(paced)
    assert paced.stats()["requests"] == 0  # the record went with the result


def test_the_client_limit_ends_a_request_before_the_router_limit(paced):
    message, waited = _timed_out(lambda: paced.client(timeout_s=1).generate([4] * 20, LONG))
    assert "Client(timeout_s=1)" in message and "router.request_timeout_s" not in message
    assert 1 <= waited < ROUTER_LIMIT_S
    assert_all_blocks_free(paced)


def test_a_timed_out_stream_yields_its_tokens_then_raises(paced):
    chunks = []

    def consume() -> None:
        for chunk in paced.client(timeout_s=1.5).stream([5] * 20, LONG):
            chunks.append(chunk)

    message, _ = _timed_out(consume)
    assert "Client(timeout_s=1.5)" in message
    assert chunks and chunks[-1].finish_reason == "error" and chunks[-1].error == message
    assert 0 < sum(len(c.token_ids) for c in chunks) < LONG.max_tokens
    assert_all_blocks_free(paced)


def test_a_timeout_during_kv_transfer_frees_both_sides(paced):
    import ray

    client = paced.client(timeout_s=1)
    _pause(paced, "decode", True)  # the request waits between the pools, its KV held on prefill
    try:
        rid = client.submit([6] * 40, SHORT)
        wait_until(lambda: sum(s["held"] for s in _instance_stats(paced, "prefill")) == 1)
        assert ray.get(client.router.describe.remote(rid))["stage"] == "transfer"
        message, _ = _timed_out(lambda: client.result(rid))
        assert "Client(timeout_s=1)" in message
        wait_until(lambda: sum(s["held"] for s in _instance_stats(paced, "prefill")) == 0)
        wait_until(lambda: sum(s["pending_admissions"] for s in _instance_stats(paced, "decode")) == 0)
    finally:
        _pause(paced, "decode", False)
    assert_all_blocks_free(paced)


def test_a_batch_returns_timed_out_requests_beside_finished_ones(paced):
    outs = paced.client(timeout_s=2).generate_batch([[7] * 10, [8] * 10], [SHORT, LONG])
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == SHORT.max_tokens
    assert outs[1].finish_reason == "error" and "Client(timeout_s=2)" in outs[1].error
    assert_all_blocks_free(paced)


def test_unread_and_aborted_requests_leave_no_records(paced):
    client = paced.client(timeout_s=120)
    unread = SamplingParams(max_tokens=1, temperature=0)  # finishes with its prefill
    for i in range(500):
        client.submit([5, 6, i % 200 + 10], unread)
    for i in range(500):
        assert client.abort(client.submit([7, 8, i % 200 + 10], LONG))
    assert paced.stats()["requests"] <= 500  # the aborted ones left at once
    wait_until(lambda: paced.stats()["requests"] == 0, timeout_s=60)  # the unread ones after the TTL
    assert_all_blocks_free(paced)
    assert paced.client().generate([9, 9, 9], SHORT).finish_reason == "length"  # and it serves on
