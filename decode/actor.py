"""Ray actor wrapping a DecodeInstance; one report to the router per step."""
from __future__ import annotations

import ray

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import EngineConfig
from tandem.engine.loop import StepLoop
from tandem.engine.params import SamplingParams
from tandem.transfer.actor import start_parallel_engine
from tandem.transfer.hosting import (build_engine, close_transports, failure_reporter, incarnation,
                                     on_loop, serve_transfer)
from tandem.transfer.protocol import HealthReport, KVHandle, RequestState, StepReport
from tandem.transfer.registry import make_transport


@ray.remote(max_restarts=0)
class DecodeActor:
    def __init__(self, instance_id: str, model_dir: str, config: EngineConfig, router_name: str,
                 transports: tuple[str, ...] = ("ray",), num_threads: int = 1,
                 transfer_timeout_s: float = 30.0, restart_on_failure: bool = False,
                 router_namespace: str = "tandem", worker_cpus: float = 1.0, worker_gpus: float = 0.0) -> None:
        """With ``config.parallelism`` above (1, 1) this actor is the controller of tp x pp worker
        actors (``transfer/actor.py``), each with ``worker_cpus``/``worker_gpus``."""
        self.instance_id = instance_id
        self.incarnation = incarnation()
        # The router by name, not by handle: a handle argument would pin an object that a
        # restart of this actor needs and Ray may have let go (ray-project/ray#53727).
        self.router = ray.get_actor(router_name, namespace=router_namespace)
        if config.parallelism.world_size > 1:
            engine, self.transports = start_parallel_engine(model_dir, config, tuple(transports), worker_cpus,
                                                            worker_gpus, num_threads, instance_id)
        else:
            # Transports first: one of them may allocate the KV cache (shared memory for shm/auto).
            self.transports = {}
            for name in transports:
                transport = make_transport(name)
                self.transports[transport.name] = transport
            engine = build_engine(model_dir, config, num_threads, list(self.transports.values()))
        self.engine = engine
        self.instance = DecodeInstance(engine, self.transports, transfer_timeout_s)
        self.loop = StepLoop(self.instance, self._publish, housekeeping=self.instance.reclaim_expired,
                             on_failure=failure_reporter(self.router, instance_id, restart_on_failure))
        self.instance.wake = self.loop.wake  # a KV pull landed: admit it at the next step

    def _publish(self, report: StepReport) -> None:
        if report.deltas or report.admitted or report.failed:
            self.router.on_decode_step.remote(self.instance_id, report)

    async def admit(self, items: list[tuple[RequestState, KVHandle]]) -> list[tuple[str, str]]:
        """Queue admissions (one call per prefill step); the ones refused here, with why."""
        return await on_loop(self.loop.call(lambda: self.instance.admit_all(items)))

    async def precopy(self, request_id: str, first_block: int, min_blocks: int = 1) -> KVHandle | None:
        """Migration source, pre-copy stage: publish the request's full blocks from
        ``first_block`` on while it keeps decoding; held until ``release_stage``."""
        return await on_loop(self.loop.call(lambda: self.instance.precopy(request_id, first_block, min_blocks)))

    async def release_stage(self, request_id: str, first_block: int | None = None) -> bool:
        return await on_loop(self.loop.call(lambda: self.instance.release_stage(request_id, first_block)))

    async def receive_stage(self, request_id: str, handle: KVHandle) -> int:
        """Migration destination, pre-copy stage: reserve and copy the stage's blocks beside the
        running steps; returns once they are in place (the blocks copied so far)."""
        copying = await on_loop(self.loop.call(lambda: self.instance.receive_stage(request_id, handle)))
        await on_loop(copying, self.instance.timeout_s + 10)
        return handle.first_block + handle.num_blocks

    async def admit_migration(self, state: RequestState, handle: KVHandle) -> None:
        """Migration destination, final stage: reserve now (ValueError if there is no room) and
        pull the rest of the KV ahead of queued admissions."""
        await on_loop(self.loop.call(lambda: self.instance.admit_migration(state, handle)))

    async def export(self, request_id: str, first_block: int = 0) -> tuple[RequestState, KVHandle]:
        """Migration source: take the request off the batch at the next step boundary, publish
        its KV from block ``first_block`` on (the rest went in pre-copy stages); held until
        ``release_export`` (committed elsewhere) or ``resume_export``."""
        return await on_loop(self.loop.call(lambda: self.instance.export(request_id, first_block)))

    async def withdraw(self, request_id: str) -> RequestState:
        """Re-dispatch, source side: a request still waiting for its prefill leaves with its
        state, held like an export (ValueError if it has started)."""
        return await on_loop(self.loop.call(lambda: self.instance.withdraw(request_id)))

    async def detach(self, request_id: str) -> RequestState:
        """Migration by recompute, source side: the request leaves the batch with its state; its
        blocks are held until ``release_export`` or ``resume_export``."""
        return await on_loop(self.loop.call(lambda: self.instance.detach(request_id)))

    async def recompute(self, state: RequestState) -> None:
        """A request moved here without its KV: queued for a prefill over its tokens so far."""
        await on_loop(self.loop.call(lambda: self.instance.recompute(state)))

    async def release_export(self, request_id: str) -> bool:
        return await on_loop(self.loop.call(lambda: self.instance.release_export(request_id)))

    async def resume_export(self, request_id: str) -> bool:
        return await on_loop(self.loop.call(lambda: self.instance.resume_export(request_id)))

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        await on_loop(self.loop.call(lambda: self.instance.submit(request_id, prompt_ids, params)))

    async def abort(self, request_id: str) -> bool:
        """Drop the request here; whether this instance held it."""
        return await on_loop(self.loop.call(lambda: self.instance.abort(request_id)))

    async def abort_all(self) -> int:
        """Drop every request (a restarted router lost them all); how many there were."""
        return await on_loop(self.loop.call(self.instance.abort_all))

    async def stats(self) -> dict:
        return {**await on_loop(self.loop.call(self.instance.stats)), "incarnation": self.incarnation}

    async def health(self) -> HealthReport:
        """Answered beside the step loop, so a long step is not taken for a death."""
        return HealthReport(self.incarnation, self.loop.failure())

    async def pause(self, paused: bool = True) -> None:
        """Stop (or resume) taking model steps at the next step boundary; calls keep working."""
        await on_loop(self.loop.call(lambda: setattr(self.loop, "paused", paused)))

    async def kv_source(self, transport: str, op: str, *args):
        """A destination's request to this instance's transport as a source (auto across nodes, nccl)."""
        return await serve_transfer(self.transports, transport, op, args)

    async def shutdown(self) -> None:
        self.loop.stop()
        self.instance.close()
        close_transports(list(self.transports.values()))
        self.engine.close()  # a parallel instance's workers
