"""Instances that leave service and come back: one that stalls (its process frozen with SIGSTOP)
is taken out of service, its requests fail with the cause, and when it thaws it drops them and
rejoins; one whose process dies is restarted by Ray and rejoins. Nothing is decoded for nobody,
no block is left behind, and the other instances serve throughout."""
from __future__ import annotations

import os
import signal

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import assert_all_blocks_free, wait_until

HEALTH_TIMEOUT_S = 2.0
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama_dir):
    """1 prefill + 2 decode; decode steps paced (20 ms) so long requests are still running when
    an instance is frozen or killed; decode instances restartable once."""
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.pacing import StepPace

    prefill = InstanceGroup(1, EngineConfig(dtype="float32", num_blocks=64, block_size=16), num_cpus=0.5)
    paced = EngineConfig(dtype="float32", num_blocks=128, block_size=16,
                         step_pace=StepPace(prefill=(0.0, 0.0, 0.0), decode=(0.02, 0.0, 0.0)))
    decode = InstanceGroup(2, paced, num_cpus=0.5, max_restarts=1)
    config = LaunchConfig(name="recover", model_dir=str(tiny_llama_dir), prefill=prefill, decode=decode,
                          health_timeout_s=HEALTH_TIMEOUT_S)
    launched = Cluster.launch(config, timeout_s=120)
    yield launched
    launched.shutdown()


def _pid(handle) -> int:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=30)


def _where(client, rids) -> dict[str, str]:
    import ray

    return {rid: ray.get(client.router.describe.remote(rid))["decode_instance"] for rid in rids}


def _on_both(client, count: int = 6) -> list[str]:
    """Long requests until each decode instance runs at least one; their ids."""
    rids = [client.submit([3, 4, i], LONG) for i in range(count)]
    wait_until(lambda: set(_where(client, rids).values()) == {"recover-decode-0", "recover-decode-1"})
    return rids


def _in_service(cluster) -> set[str]:
    return {n for n, s in cluster.stats()["instances"].items() if "error" not in s}


def _check_outcomes(client, rids, victim: str, cause: str) -> None:
    """Requests on the victim ended with the cause; the others ran to their end."""
    where = _where(client, rids)
    for rid in rids:
        out = client.result(rid)
        if where[rid] == victim:
            assert out.finish_reason == "error" and victim in out.error and cause in out.error, out.error
        else:
            assert (out.finish_reason, len(out.token_ids)) == ("length", 400)


def _serves_on_both(client) -> None:
    """New requests reach both decode instances again, and finish."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rids = [client.submit([7, 8, i], params) for i in range(8)]
    where = wait_until(lambda: (w := _where(client, rids)) and None not in w.values() and w)
    assert set(where.values()) == {"recover-decode-0", "recover-decode-1"}
    assert {client.result(rid).finish_reason for rid in rids} == {"length"}


def test_a_frozen_instance_leaves_service_then_drops_its_stale_requests_and_rejoins(cluster):
    client = cluster.client(timeout_s=120)
    rids = _on_both(client)
    pid = _pid(cluster.actors["recover-decode-0"])
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: "recover-decode-0" not in _in_service(cluster), timeout_s=30)
        status = cluster.stats()["instances"]["recover-decode-0"]["error"]
        assert f"stopped answering for {HEALTH_TIMEOUT_S:g}s" in status
    finally:
        os.kill(pid, signal.SIGCONT)
    _check_outcomes(client, rids, "recover-decode-0", f"stopped answering for {HEALTH_TIMEOUT_S:g}s")
    wait_until(lambda: _in_service(cluster) == {"recover-prefill-0", "recover-decode-0", "recover-decode-1"},
               timeout_s=30)
    assert_all_blocks_free(cluster)  # the thawed instance decoded nothing further for nobody
    assert _pid(cluster.actors["recover-decode-0"]) == pid  # the same process, back in service
    _serves_on_both(client)


def test_an_instance_whose_process_dies_is_restarted_and_rejoins(cluster):
    client = cluster.client(timeout_s=120)
    rids = _on_both(client)
    pid = _pid(cluster.actors["recover-decode-1"])
    os.kill(pid, signal.SIGKILL)
    _check_outcomes(client, rids, "recover-decode-1", "recover-decode-1")
    wait_until(lambda: _in_service(cluster) == {"recover-prefill-0", "recover-decode-0", "recover-decode-1"},
               timeout_s=90)
    assert _pid(cluster.actors["recover-decode-1"]) != pid  # a new process
    assert_all_blocks_free(cluster)
    _serves_on_both(client)
