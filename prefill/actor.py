"""Ray actor wrapping a PrefillInstance; model steps run on a worker thread (never the event loop)."""
from __future__ import annotations

import ray

from tandem.engine.engine import EngineConfig
from tandem.engine.loop import StepLoop
from tandem.engine.params import SamplingParams
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.actor import start_parallel_engine
from tandem.transfer.hosting import (build_engine, close_transports, failure_reporter, incarnation,
                                     on_loop, serve_transfer)
from tandem.transfer.protocol import HealthReport
from tandem.transfer.registry import make_transport


@ray.remote(max_restarts=0)
class PrefillActor:
    def __init__(self, instance_id: str, model_dir: str, config: EngineConfig, router_name: str,
                 transport: str = "ray", num_threads: int = 1, hold_timeout_s: float = 60.0,
                 restart_on_failure: bool = False, router_namespace: str = "tandem",
                 worker_cpus: float = 1.0, worker_gpus: float = 0.0) -> None:
        """With ``config.parallelism`` above (1, 1) this actor is the controller of tp x pp worker
        actors (``transfer/actor.py``), each with ``worker_cpus``/``worker_gpus``."""
        self.instance_id = instance_id
        self.incarnation = incarnation()
        # The router by name, not by handle: a handle argument would pin an object that a
        # restart of this actor needs and Ray may have let go (ray-project/ray#53727).
        self.router = ray.get_actor(router_name, namespace=router_namespace)
        if config.parallelism.world_size > 1:
            engine, transports = start_parallel_engine(model_dir, config, (transport,), worker_cpus,
                                                       worker_gpus, num_threads, instance_id)
            self.transport = transports[transport]
        else:
            self.transport = make_transport(transport)  # first: it may allocate the KV cache
            engine = build_engine(model_dir, config, num_threads, [self.transport])
        self.engine = engine
        self.instance = PrefillInstance(engine, self.transport, hold_timeout_s)
        self.loop = StepLoop(self.instance, self._publish, housekeeping=self.instance.reclaim_expired,
                             on_failure=failure_reporter(self.router, instance_id, restart_on_failure))

    def _publish(self, results) -> None:
        if results:  # one message per step, all of the step's requests
            self.router.on_prefilled.remote(self.instance_id, results)

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        await on_loop(self.loop.call(lambda: self.instance.submit(request_id, prompt_ids, params)))

    async def ack(self, request_ids: list[str]) -> None:
        await on_loop(self.loop.call(lambda: [self.instance.ack(r) for r in request_ids]))

    async def abort(self, request_id: str) -> None:
        await on_loop(self.loop.call(lambda: self.instance.abort(request_id)))

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
        """A destination's request to this source's transport (auto: cross-node export; nccl)."""
        return await serve_transfer({self.transport.name: self.transport}, transport, op, args)

    async def shutdown(self) -> None:
        self.loop.stop()
        close_transports([self.transport])
        self.engine.close()  # a parallel instance's workers
