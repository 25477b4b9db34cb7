"""Transports between two actors on one Ray node: byte-exact round trips for every CPU backend,
timeouts and dead sources, and shared-memory pools that do not outlive their instances.

No test sleeps to let something happen: sources whose KV never appears are ``Gate`` actors that
block on an event, and each test waits (bounded) for a positive signal that the state it needs
was reached before acting.
"""
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


@pytest.fixture(scope="module")
def gate_cls(ray_cluster):
    """A source whose object exists only once opened. Defined here, not at module level, so that
    Ray pickles it by value (this test module is not importable in the workers)."""
    import asyncio

    @ray_cluster.remote(num_cpus=0, max_restarts=0)
    class Gate:
        def __init__(self) -> None:
            self._open, self._waiting, self._arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def wait(self) -> None:
            """The pending object: ready when the gate opens, lost if the gate dies first."""
            self._waiting.set()
            await self._open.wait()

        async def waiting(self) -> None:
            """Returns once a ``wait`` call is running, i.e. the object is being produced."""
            await self._waiting.wait()

        async def arrive(self) -> None:
            self._arrived.set()

        async def arrived(self) -> None:
            """Returns once somebody called ``arrive``."""
            await self._arrived.wait()

        async def open(self) -> None:
            self._open.set()

    return Gate


@pytest.fixture(scope="module")
def announcing_peer_cls(ray_cluster):
    """A KVPeer whose fetch first tells a gate it is about to block on the source's object."""
    from tests.integration.kv_peer import KVPeer

    class AnnouncingPeer(KVPeer):
        def fetch_announced(self, gate, handle, block_ids, timeout_s):  # type: ignore[no-untyped-def]
            import ray

            ray.get(gate.arrive.remote(), timeout=30)
            return self.fetch(handle, block_ids, timeout_s)

    return ray_cluster.remote(num_cpus=0.25, max_restarts=0)(AnnouncingPeer)


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
        assert handle.payload.local is not None and handle.payload.ray is None
        assert ray.get(source.info.remote())["remote_exports"] == 0
    ray.get(source.release.remote(handle))
    if backend != "ray":  # shm checks the export is live; the object store cannot know
        assert "released before the fetch" in ray.get(dest.fetch.remote(handle, DST_IDS))


def _handle_for(ref, request_id: str):  # type: ignore[no-untyped-def]
    from tandem.transfer.protocol import KVHandle, KVLayout

    layout = KVLayout(SHAPE[0], SHAPE[3], SHAPE[4], SHAPE[5], "float32")
    return KVHandle("ray", request_id, 4, 1, layout, payload=[ref])


def test_ray_fetch_times_out(ray_cluster, make_pair, gate_cls):
    """An object whose source is alive but never produces it: the fetch gives up at its own
    timeout, with an error naming it, instead of waiting for the object."""
    ray = ray_cluster
    _, dest = make_pair("ray")
    gate = gate_cls.remote()
    try:
        handle = _handle_for(gate.wait.remote(), "slow")
        ray.get(gate.waiting.remote(), timeout=30)  # the object is being produced, not lost
        start = time.monotonic()
        error = ray.get(dest.fetch.remote(handle, [0], 0.5), timeout=30)
        assert "slow: KV fetch timed out after 0.5s" in error and time.monotonic() - start < 10
        assert not ray.wait(handle.payload, timeout=0)[0]  # it timed out: the object never came
    finally:
        ray.get(gate.open.remote(), timeout=30)
        ray.kill(gate)


def test_ray_fetch_from_a_source_that_dies_fails(ray_cluster, gate_cls, announcing_peer_cls):
    """A fetch blocked on an object whose source dies before producing it fails at once with the
    actor's death, not at its 20 s timeout. (Once stored, exported KV may outlive its owner in the
    object store for a while; a source that dies before its object exists never can.)"""
    ray = ray_cluster
    dest = announcing_peer_cls.remote("ray", shape(DST_BLOCKS), "float32")
    source = gate_cls.remote()
    try:
        handle = _handle_for(source.wait.remote(), "r1")
        ray.get(source.waiting.remote(), timeout=30)
        fetching = dest.fetch_announced.remote(source, handle, [0], 20)
        # The destination is one call away from blocking on the object. Had it not got there
        # before the kill, its get would fail the same way, only without having waited.
        ray.get(source.arrived.remote(), timeout=30)
        ray.kill(source)
        start = time.monotonic()
        error = ray.get(fetching, timeout=60)
        assert error.startswith("request r1: KV fetch failed (") and "Actor" in error
        assert time.monotonic() - start < 15
    finally:
        ray.kill(dest)


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



@pytest.mark.parametrize("backend", ["ray", "auto"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_resharding_moves_are_byte_exact_through_each_ray_backend(ray_cluster, backend, kv_heads):
    """Every (tp, pp) source to every destination, each worker with its own transport (the
    shared-memory transport runs the same check in tests/unit)."""
    from tandem.transfer.registry import make_transport
    from tests.unit.test_resharding_transfer import check_every_pair

    check_every_pair(kv_heads, lambda: make_transport(backend))
