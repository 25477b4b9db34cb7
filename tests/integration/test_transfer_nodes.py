"""The ``auto`` transport across Ray nodes: two Ray nodes on this host (ray.cluster_utils), one
peer actor pinned to each through a custom node resource. Across nodes auto must not map shared
memory; it asks the source for an object-store export instead."""
from __future__ import annotations

import time

import pytest

from tests.integration.conftest import wait_until
from tandem.transfer.shm_pool import SHM_DIR, pid_alive, sweep_orphans

SHAPE = (3, 2, 24, 4, 2, 8)
SRC_IDS, DST_IDS = [7, 2, 9, 4, 0, 11, 12], [1, 3, 5, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 4}})
    cluster.add_node(num_cpus=2, resources={"node_b": 4})
    ray.init(address=cluster.address, namespace="tandem-nodes", log_to_driver=False)
    cluster.wait_for_nodes()
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def peer_on(two_nodes):
    from tests.integration.kv_peer import KVPeer

    ray, started = two_nodes, []
    cls = ray.remote(num_cpus=0.25, max_restarts=0)(KVPeer)

    def start(node: str, backend: str = "auto", dtype: str = "bfloat16"):
        peer = cls.options(resources={node: 1}).remote(backend, SHAPE, dtype)
        started.append(peer)
        return peer

    yield start
    pools = []
    for peer in started:
        try:
            pools.append(ray.get(peer.info.remote(), timeout=30)["pool"])
            ray.get(peer.close.remote(), timeout=30)
        except ray.exceptions.RayActorError:  # killed by the test
            pass
        ray.kill(peer)
    assert not [p for p in pools if p and (SHM_DIR / p).exists()]


def test_auto_falls_back_to_the_object_store_across_nodes(two_nodes, peer_on):
    ray = two_nodes
    source, dest = peer_on("node_a"), peer_on("node_b")
    ray.get(source.fill.remote(seed=5))
    handle = ray.get(source.export.remote("r1", SRC_IDS, 100))
    dest_node = ray.get(dest.info.remote())["node_id"]
    assert handle.node_id == ray.get(source.info.remote())["node_id"] != dest_node
    assert ray.get(dest.fetch.remote(handle, DST_IDS)) is None
    assert ray.get(dest.blocks.remote(DST_IDS)) == ray.get(source.blocks.remote(SRC_IDS))
    assert ray.get(source.info.remote())["remote_exports"] == 1
    assert ray.get(dest.fetch.remote(handle, DST_IDS)) is None  # a retry reuses that export
    assert ray.get(source.info.remote())["remote_exports"] == 1
    ray.get(source.release.remote(handle))
    error = ray.get(dest.fetch.remote(handle, DST_IDS))
    assert "r1: the source could not export the KV for another node" in error
    assert "released before the fetch" in error


def test_shm_refuses_another_node(two_nodes, peer_on):
    ray = two_nodes
    source, dest = peer_on("node_a", "shm", "float32"), peer_on("node_b", "shm", "float32")
    handle = ray.get(source.export.remote("r1", [1], 4))
    error = ray.get(dest.fetch.remote(handle, [0]))
    assert "is in shared memory on node" in error and "use backend auto or ray" in error


def test_auto_with_a_dead_source_on_another_node_fails_promptly(two_nodes, peer_on):
    ray = two_nodes
    source, dest = peer_on("node_a"), peer_on("node_b")
    handle = ray.get(source.export.remote("r1", SRC_IDS, 100))
    victim = ray.get(source.info.remote())
    ray.kill(source)
    wait_until(lambda: _dead(ray, source), 30)
    start = time.monotonic()
    error = ray.get(dest.fetch.remote(handle, DST_IDS, 20))
    assert "r1: the source could not export the KV for another node (" in error
    assert time.monotonic() - start < 15
    # SIGKILL left the source's pool behind; the next pool on its node would sweep it: do so now.
    wait_until(lambda: not pid_alive(victim["pid"]), 30)
    assert victim["pool"] in sweep_orphans(SHM_DIR)


def _dead(ray, actor) -> bool:
    try:
        ray.get(actor.info.remote(), timeout=10)
        return False
    except ray.exceptions.RayActorError:
        return True
