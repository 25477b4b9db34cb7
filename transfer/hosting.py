"""What every instance actor (prefill, decode) needs to host its engine beside its transports:
thread limits, the engine over a transport-allocated KV cache, awaiting the step loop, and the
source side of transports that ask the source for something (auto across nodes, nccl). No Ray."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

from tandem.engine.engine import Engine, EngineConfig
from tandem.transfer.base import Transport

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 5.0  # how long a failing instance waits for the router to take its report


def openmp_options(num_threads: int) -> dict[str, Any]:
    """Ray actor options for an engine process with ``num_threads`` torch threads: its OpenMP
    environment, set before the process starts (libgomp reads it once, when torch loads). A
    multi-threaded engine's threads spin for a while between the many short parallel regions of a
    step, then sleep, so an idle instance burns no core (plain ACTIVE spins forever; PASSIVE
    sleeps after every region, which cost a 2-thread decode step all its gain over one thread:
    benchmarks/RESULTS.md, issue 21's section). A one-thread engine has no OpenMP workers to
    wait for: no options (a runtime environment costs each actor a fresh worker process)."""
    if num_threads <= 1:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)}}}


SPIN_COUNT = 300_000  # libgomp's own default: well under a millisecond of spinning


def warn_if_niced() -> None:
    """Say so when this engine's process runs below normal priority (Ray's workers start at
    niceness 15 unless the cluster was started with RAY_worker_niceness=0)."""
    niceness = os.nice(0)
    if niceness > 0:
        log.warning("this instance runs at niceness %d: any process at normal priority on its node "
                    "takes its cores first; start Ray with RAY_worker_niceness=0 for serving", niceness)


def build_engine(model_dir: str, config: EngineConfig, num_threads: int,
                 transports: Sequence[Transport] = ()) -> Engine:
    """The instance's engine, its KV cache allocated by the first transport that allocates caches
    on its device (shared memory for shm/auto, the GPU for cuda_ipc)."""
    import torch

    torch.set_num_threads(max(1, num_threads))
    warn_if_niced()
    try:
        return Engine(Path(model_dir), config, kv_allocator=cache_allocator(transports, config.device))
    except BaseException:
        close_transports(transports)  # e.g. unlink a shared-memory pool nobody will use
        raise


def cache_allocator(transports: Sequence[Transport], device: str):
    """The allocator of the first transport that makes caches for a ``device`` engine (shm, auto:
    host shared memory for a CPU one; cuda_ipc, auto: the GPU), or None (the engine allocates)."""
    for transport in transports:
        allocator = getattr(transport, "allocator_for", lambda _: None)(device)
        if allocator is not None:
            return allocator
    return None


async def serve_transfer(transports: dict[str, Transport], name: str, op: str, args: tuple) -> Any:
    """Run a peer's request ``serve_<op>(*args)`` on this instance's ``name`` transport, off the
    event loop (it may pack KV or wait on NCCL)."""
    return await asyncio.to_thread(serving_method(transports, name, op), *args)


def serving_method(transports: dict[str, Transport], name: str, op: str) -> Callable[..., Any]:
    """The ``name`` transport's ``serve_<op>``; ValueError if there is none."""
    method = getattr(transports.get(name), f"serve_{op}", None)
    if method is None:
        raise ValueError(f"this instance has no {name!r} transport serving {op!r}")
    return method


def close_transports(transports: Sequence[Transport]) -> None:
    """Release what transports hold outside the process (shm pools, NCCL communicators)."""
    for transport in transports:
        close = getattr(transport, "close", None)
        if close is not None:
            close()


async def on_loop(future: Future, timeout_s: float = 60.0):
    """Await a StepLoop call from the actor's event loop, bounded."""
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)


def failure_reporter(router, instance_id: str, exit_process: bool = False) -> Callable[[BaseException], None]:
    """A StepLoop ``on_failure`` that tells the router at once that this instance's step failed
    (it takes the instance out of service and fails its requests with the cause). With
    ``exit_process`` (Ray may restart the actor) the process then exits, once the report is
    delivered or after a few seconds: a failed step may have left the engine in any state, and a
    fresh process rejoins the router clean."""
    def report(exc: BaseException) -> None:
        ref = router.on_instance_failed.remote(instance_id, f"{type(exc).__name__}: {exc}")
        if exit_process:
            try:
                ref.future().result(timeout=REPORT_TIMEOUT_S)
            except Exception:  # the router is gone too: Ray restarts this actor all the same
                pass
            os._exit(1)

    return report


def incarnation() -> str:
    """A new id for each start of an instance actor's process (see HealthReport)."""
    return uuid.uuid4().hex
