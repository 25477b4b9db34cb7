"""Transports between two actors on one Ray node: byte-exact round trips for every CPU backend,
timeouts and dead sources, and shared-memory pools that do not outlive their instances."""
from __future__ import annotations

import time

import pytest

from tests.integration.conftest import wait_until
from tandem.transfer.shm_pool import SHM_DIR, pid_alive

SRC_BLOCKS, DST_BLOCKS = 24, 21
SHAPE = (3, 2, 0, 4, 2, 8)
SRC_IDS = [7, 2, 9, 4, 0, 11, 12, 13, 20]  # 9 blocks: odd, scattered, one run of three
DST_IDS = [1, 3, 5, 7, 8, 9, 10, 14, 2]


def shape(num_blocks: int) -> tuple[int, ...]:
    return (*SHAPE[:2], num_blocks, *SHAPE[3:])


@pytest.fixture(scope="module")
def peer_cls(ray_cluster):
    from tests.integration.kv_peer import KVPeer

    return ray_cluster.remote(num_cpus=0.25, max_restarts=0)(KVPeer)


@pytest.fixture
def make_pair(ray_cluster, peer_cls):
    """Start (source, destination) peers; afterwards close them and check their pools are gone."""
    started = []

    def make(backend: str, dtype: str = "float32", blocks: tuple[int, int] = (SRC_BLOCKS, DST_BLOCKS)):
        pair = (peer_cls.remote(backend, shape(blocks[0]), dtype),
                peer_cls.remote(backend, shape(blocks[1]), dtype))
        started.extend(pair)
        return pair

    yield make
    pools = [info["pool"] for info in _infos(ray_cluster, started) if info and info["pool"]]
    ray_cluster.get([p.close.remote() for p in started if _alive(ray_cluster, p)], timeout=30)
    for peer in started:
        ray_cluster.kill(peer)
    assert not [p for p in pools if (SHM_DIR / p).exists()]


def _alive(ray, peer) -> bool:
    try:
        ray.get(peer.info.remote(), timeout=30)
        return True
    except ray.exceptions.RayActorError:
        return False


def _infos(ray, peers) -> list[dict | None]:
    return [ray.get(p.info.remote(), timeout=30) if _alive(ray, p) else None for p in peers]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["ray", "shm", "auto"])
def test_round_trip_between_actors_is_byte_exact(ray_cluster, make_pair, backend, dtype):
    ray = ray_cluster
    source, dest = make_pair(backend, dtype)
    ray.get(source.fill.remote(seed=3))
    handle = ray.get(source.export.remote("r1", SRC_IDS, 140))
    assert ray.get(dest.fetch.remote(handle, DST_IDS)) is None
    assert ray.get(dest.blocks.remote(DST_IDS)) == ray.get(source.blocks.remote(SRC_IDS))
    others = [b for b in range(DST_BLOCKS) if b not in DST_IDS]
    assert not any(ray.get(dest.blocks.remote(others)))  # nothing else was written
    if backend == "auto":  # same node: shared memory, no object-store export
        assert handle.payload.shm is not None and handle.payload.ray is None
        assert ray.get(source.info.remote())["remote_exports"] == 0
    ray.get(source.release.remote(handle))
    if backend != "ray":  # shm checks the export is live; the object store cannot know
        assert "released before the fetch" in ray.get(dest.fetch.remote(handle, DST_IDS))


def test_ray_fetch_times_out(ray_cluster, make_pair):
    ray = ray_cluster
    from tandem.transfer.protocol import KVHandle, KVLayout

    @ray.remote(num_cpus=0)
    def never_ready():
        time.sleep(60)

    _, dest = make_pair("ray")
    layout = KVLayout(SHAPE[0], SHAPE[3], SHAPE[4], SHAPE[5], "float32")
    handle = KVHandle("ray", "slow", 4, 1, layout, payload=[never_ready.remote()])
    start = time.monotonic()
    error = ray.get(dest.fetch.remote(handle, [0], 0.5))
    assert "slow: KV fetch timed out after 0.5s" in error and time.monotonic() - start < 10


def test_ray_fetch_from_a_source_that_dies_fails(ray_cluster, make_pair):
    ray = ray_cluster
    from tandem.transfer.protocol import KVHandle, KVLayout

    @ray.remote(num_cpus=0, max_restarts=0)
    class Doomed:
        def kv(self):
            time.sleep(60)

    # (Once stored, exported KV may outlive its owner in the object store; a source that dies
    # before its object exists never can.)
    _, dest = make_pair("ray")
    doomed = Doomed.remote()
    layout = KVLayout(SHAPE[0], SHAPE[3], SHAPE[4], SHAPE[5], "float32")
    handle = KVHandle("ray", "r1", 4, 1, layout, payload=[doomed.kv.remote()])
    fetching = dest.fetch.remote(handle, [0], 20)
    time.sleep(0.5)
    ray.kill(doomed)
    start = time.monotonic()
    error = ray.get(fetching, timeout=60)
    assert error.startswith("request r1: KV fetch failed (") and "Actor" in error
    assert time.monotonic() - start < 15


def test_shm_pool_of_a_killed_instance_is_swept(ray_cluster, make_pair, peer_cls):
    ray = ray_cluster
    source, dest = make_pair("shm")
    # Both pools made (each new pool sweeps): a destination still starting would sweep too early.
    info, _ = ray.get([source.info.remote(), dest.info.remote()])
    handle = ray.get(source.export.remote("r1", [1, 2], 8))
    ray.kill(source)  # SIGKILL: no atexit, the pool file stays behind...
    wait_until(lambda: not pid_alive(info["pid"]), 30)
    assert (SHM_DIR / info["pool"]).exists()
    newcomer = peer_cls.remote("shm", shape(4), "float32")  # ...until the next pool on the node
    try:
        ray.get(newcomer.info.remote())
        assert not (SHM_DIR / info["pool"]).exists()
        assert "is gone" in ray.get(dest.fetch.remote(handle, [0, 1]))
    finally:
        ray.get(newcomer.close.remote())
        ray.kill(newcomer)

