"""The workers of a tensor/pipeline-parallel instance as Ray actors, and the controller's side of
them: its worker group (steps) and its transports (KV export, fetch, release on every worker).

An instance with parallelism (tp, pp) is a controller (the prefill or decode actor: scheduler and
block manager, no model) and tp x pp ``ShardWorkerActor``s, one per bundle of the instance's
placement group, each with its model shard, its slice of the KV cache and its own transports. The
controller starts them (so they die with it), joins them in one ``torch.distributed`` group, and
sends each step's inputs to all of them; the output worker returns the logits. Every wait is
bounded; a worker that dies or fails fails the step (and so the instance) with an error naming it.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import msgspec
import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem.engine.config import load_config
from tandem.engine.step_inputs import StepInputs
from tandem.engine.worker import WorkerConfig, WorkerFailed, pack_result, unpack_result
from tandem.transfer.base import TransferError
from tandem.transfer.hosting import cache_allocator, close_transports, openmp_options, serving_method
from tandem.transfer.protocol import KVHandle, KVLayout, remote_cause
from tandem.transfer.registry import make_transport
from tandem.transfer.sharded import fetch_shard, sharded_handle, source_of

STARTUP_TIMEOUT_S = 300.0  # a worker loads its shard before it answers
CALL_MARGIN_S = 5.0  # on top of a worker's own bound (collectives, transfers)


@ray.remote(max_restarts=0, max_concurrency=8)
class ShardWorkerActor:
    """One worker: its shard, its KV cache (allocated by its first transport that allocates), and
    its transports. Threaded: a KV fetch runs beside the steps, into blocks no step touches."""

    def __init__(self, transports: tuple[str, ...], num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.transports = {}
        for name in transports:
            transport = make_transport(name)
            self.transports[transport.name] = transport
        self.worker = None
        self.comm = None
        self.turn = threading.Condition()  # orders the steps a controller keeps in flight
        self.last_ticket = 0

    def rendezvous(self) -> str:
        """An address for the group's ``torch.distributed`` rendezvous, on this worker's node."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return f"tcp://{host}:{sock.getsockname()[1]}"

    def start(self, config: WorkerConfig, rank: int, init_method: str) -> None:
        from tandem.engine.collective import DistributedCollective
        from tandem.engine.parallel import WorkerShard
        from tandem.engine.worker import ShardWorker

        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        self.comm = DistributedCollective(WorkerShard(config.parallelism, rank), init_method,
                                          config.timeout_s, backend)
        allocator = cache_allocator(list(self.transports.values()), config.device)
        self.worker = ShardWorker(config, rank, self.comm, allocator)

    def run(self, inputs: StepInputs, ticket: int) -> tuple | None:
        """Step ``ticket`` (1, 2, ...): steps in flight together run one at a time in ticket
        order, as the controller sent them, though the actor's threads may pick their calls up in
        any order."""
        with self.turn:
            if not self.turn.wait_for(lambda: self.last_ticket == ticket - 1, timeout=self.worker.config.timeout_s):
                raise TimeoutError(f"step {ticket} waited {self.worker.config.timeout_s:.0f} s for step "
                                   f"{ticket - 1}, which never came")
            try:
                return pack_result(self.worker.run(inputs))
            finally:
                self.last_ticket = ticket
                self.turn.notify_all()

    def export(self, transport: str, request_id: str, block_ids: list[int], num_tokens: int) -> KVHandle:
        return self.transports[transport].export(self.worker.kv_cache, request_id, block_ids, num_tokens)

    def release(self, transport: str, handle: KVHandle) -> None:
        self.transports[transport].release(handle)

    def fetch(self, transport: str, handle: KVHandle, block_ids: list[int], timeout_s: float) -> None:
        shard = self.worker.shard
        fetch_shard(self.transports[transport], handle, shard.parallelism, shard.rank, self.worker.kv_cache,
                    block_ids, timeout_s)

    def kv_source(self, transport: str, op: str, *args):
        """A destination's request to this worker's transport as a source (auto across nodes).
        Not ``async``: one async method would make Ray run every method on one event loop, and a
        KV fetch would then hold up the steps."""
        return serving_method(self.transports, transport, op)(*args)

    def shutdown(self) -> None:
        close_transports(list(self.transports.values()))
        if self.comm is not None:
            self.comm.close()


class ShardedCache(msgspec.Struct, frozen=True):
    """What a parallel instance's engine gives as its KV cache: a description, not the tensors
    (those live on the workers). ``layout`` is the whole model's."""

    layout: KVLayout


class RayWorkerGroup:
    """A controller's tp x pp worker actors, in its placement group's bundles (one each) when it
    has one; ``run`` drives a step on all of them."""

    def __init__(self, config: WorkerConfig, transports: tuple[str, ...], num_cpus: float = 1.0,
                 num_gpus: float = 0.0, num_threads: int = 1, name: str | None = None) -> None:
        """``name``: the workers are the named actors ``{name}-worker-{rank}`` (an operator can find
        and inspect them; they die with this process, which owns them)."""
        self.config = config
        par = config.parallelism
        group = get_current_placement_group()
        self.workers = []
        for rank in range(par.world_size):
            if name is not None:
                _kill_leftover(f"{name}-worker-{rank}")
            strategy = None if group is None else PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            self.workers.append(ShardWorkerActor.options(
                num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategy,
                **openmp_options(num_threads),
                name=None if name is None else f"{name}-worker-{rank}",
            ).remote(transports, num_threads))
        try:
            init_method = self._wait([self.workers[0].rendezvous.remote()], STARTUP_TIMEOUT_S, "starting")[0]
            self._wait([w.start.remote(config, rank, init_method) for rank, w in enumerate(self.workers)],
                       STARTUP_TIMEOUT_S, "loading its shard")
        except BaseException:
            self.kill()
            raise
        model = load_config(Path(config.model_dir))
        self.kv_cache = ShardedCache(KVLayout(model.num_layers, config.block_size, model.num_kv_heads,
                                              model.head_dim, config.dtype))
        self.failed: str | None = None
        self.tickets = 0  # steps submitted

    def run(self, inputs: StepInputs) -> torch.Tensor:
        return self.collect(self.submit(inputs))

    def submit(self, inputs: StepInputs) -> list:
        """Send a step to every worker without waiting (each runs its steps in ticket order)."""
        if self.failed:
            raise WorkerFailed(f"the worker group failed earlier and cannot step: {self.failed}")
        self.tickets += 1
        return [w.run.remote(inputs, self.tickets) for w in self.workers]

    def collect(self, refs: list) -> torch.Tensor:
        """A submitted step's result (steps are collected in the order submitted)."""
        try:
            answers = self._wait(refs, self.config.timeout_s + CALL_MARGIN_S, "stepping")
        except WorkerFailed as exc:
            self.failed = str(exc)
            raise
        return unpack_result(answers[self.config.parallelism.output_rank])

    def call_all(self, method: str, *args, timeout_s: float, doing: str) -> list:
        """``method(*args)`` on every worker at once; their answers by rank."""
        return self._wait([getattr(w, method).remote(*args) for w in self.workers], timeout_s, doing)

    def call_each(self, method: str, per_rank_args: list[tuple], timeout_s: float, doing: str) -> list:
        return self._wait([getattr(w, method).remote(*args) for w, args in zip(self.workers, per_rank_args)],
                          timeout_s, doing)

    def _wait(self, refs: list, timeout_s: float, doing: str) -> list:
        """Every answer, or WorkerFailed naming the first worker that failed or the ones that did
        not answer in ``timeout_s`` (a failure is seen at once, not after the others' waits)."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                ranks = sorted(rank_of[r] for r in pending)
                raise WorkerFailed(f"worker(s) {ranks} of {len(refs)} gave no answer in {timeout_s:.0f} s "
                                   f"while {doing}")
            try:
                ray.get(done[0])
            except Exception as exc:
                raise WorkerFailed(f"worker {rank_of[done[0]]} of {len(refs)} failed while {doing}: "
                                   f"{remote_cause(exc)}") from None
        return ray.get(refs)

    def close(self) -> None:
        """Let every worker release what outlives it (shared-memory pools), then kill them."""
        if not self.workers:
            return
        ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        self.kill()

    def kill(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


def _kill_leftover(name: str) -> None:
    """A worker of this instance's previous incarnation (Ray restarted the instance) may still be
    on its way out under the name the new one takes."""
    try:
        ray.kill(ray.get_actor(name), no_restart=True)
    except ValueError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.1)


class ShardedTransport:
    """A parallel instance's transport of one name (shm, ray, auto): each worker exports, fetches
    and releases its own shard through its own transport of that name, in parallel. A fetch has
    every destination worker pull exactly its slices (``transfer/sharded.py``), so it ``reshards``."""

    reshards = True

    def __init__(self, name: str, group: RayWorkerGroup) -> None:
        self.name = name
        self.group = group

    @staticmethod
    def never_waits(handle: KVHandle) -> bool:
        return False  # a fetch waits on the workers

    def export(self, kv_cache, request_id: str, block_ids: list[int], num_tokens: int) -> KVHandle:
        handles = self.group.call_all("export", self.name, request_id, list(block_ids), num_tokens,
                                      timeout_s=60.0, doing=f"exporting request {request_id}")
        return sharded_handle(self.name, request_id, num_tokens, len(block_ids), self.group.kv_cache.layout,
                              self.group.config.parallelism, handles)

    def fetch(self, handle: KVHandle, kv_cache, block_ids: list[int], timeout_s: float) -> None:
        try:
            self.group.call_all("fetch", self.name, handle, list(block_ids), timeout_s,
                                timeout_s=timeout_s + CALL_MARGIN_S, doing=f"fetching request {handle.request_id}")
        except WorkerFailed as exc:  # the caller frees the reservation and reports the request
            raise TransferError(f"request {handle.request_id}: {exc}") from None

    def release(self, handle: KVHandle) -> None:
        _, parts = source_of(handle)
        if len(parts) != len(self.group.workers):
            return  # not this instance's export
        self.group.call_each("release", [(self.name, part) for part in parts], timeout_s=30.0,
                             doing=f"releasing request {handle.request_id}")

    def close(self) -> None:
        """The workers' transports close with the workers (``RayWorkerGroup.close``)."""


def start_parallel_engine(model_dir: str, config, transports: tuple[str, ...], num_cpus: float,
                          num_gpus: float, num_threads: int, name: str | None = None):
    """A parallel instance's engine (the controller) over its worker actors (named after the
    instance ``name``), and its transports by name; called inside the instance actor."""
    from tandem.engine.engine import Engine

    groups: list[RayWorkerGroup] = []

    def workers(worker_config: WorkerConfig) -> RayWorkerGroup:
        groups.append(RayWorkerGroup(worker_config, transports, num_cpus, num_gpus, num_threads, name))
        return groups[0]

    engine = Engine(Path(model_dir), config, workers=workers)
    return engine, {name: ShardedTransport(name, groups[0]) for name in transports}
