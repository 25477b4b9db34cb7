"""A parallel instance's workers as local processes: one spawned process per rank, each with its
model shard and cache, joined by ``torch.distributed`` (gloo over loopback); the controller sends
each step's inputs down a pipe to every worker and reads the logits from the output worker.

This is how ``LLM`` and a bare ``Engine`` run tp/pp on one machine without Ray. Every wait is
bounded: a worker that dies, raises or stops answering fails the step with an error naming it,
and the group refuses further steps (its collectives are out of step).
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from multiprocessing.connection import Connection

import msgspec
import torch

from tandem.engine.step_inputs import StepInputs
from tandem.engine.worker import WorkerConfig, WorkerFailed, pack_result, unpack_result

STARTUP_TIMEOUT_S = 300.0  # each worker loads its shard before its first answer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(config_bytes: bytes, rank: int, init_method: str, threads: int, conn: Connection) -> None:
    from tandem.engine.collective import DistributedCollective
    from tandem.engine.parallel import WorkerShard
    from tandem.engine.worker import ShardWorker

    torch.set_num_threads(threads)
    try:
        config = msgspec.msgpack.decode(config_bytes, type=WorkerConfig)
        comm = DistributedCollective(WorkerShard(config.parallelism, rank), init_method, config.timeout_s)
        worker = ShardWorker(config, rank, comm)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    decoder = msgspec.msgpack.Decoder(StepInputs)
    while True:
        data = conn.recv_bytes()
        if not data:  # the controller closes the group
            comm.close()
            return
        try:
            logits = worker.run(decoder.decode(data))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", pack_result(logits)))


class ProcessWorkerGroup:
    """Spawns ``world_size`` worker processes and drives them in lockstep."""

    def __init__(self, config: WorkerConfig, threads_per_worker: int | None = None) -> None:
        par = config.parallelism
        self.config = config
        self.output_rank = par.output_rank
        self.failed: str | None = None
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // par.world_size)
        context = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        encoded = msgspec.msgpack.encode(config)
        self.conns: list[Connection] = []
        self.procs = []
        for rank in range(par.world_size):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_worker_main, args=(encoded, rank, init_method, threads, theirs),
                                   name=f"tandem-worker-{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        try:
            for rank in range(par.world_size):
                self._answer(rank, STARTUP_TIMEOUT_S, "starting")
        except WorkerFailed:
            self.close()
            raise
        self.encoder = msgspec.msgpack.Encoder()
        self.submitted = self.collected = 0  # steps sent, steps answered

    def run(self, inputs: StepInputs) -> torch.Tensor:
        return self.collect(self.submit(inputs))

    def submit(self, inputs: StepInputs) -> int:
        """Send a step to every worker without waiting; each worker runs its steps in the order
        sent. The ticket is for ``collect``, which must take steps in the same order."""
        if self.failed:
            raise WorkerFailed(f"the worker group failed earlier and cannot step: {self.failed}")
        payload = self.encoder.encode(inputs)
        try:
            for rank, conn in enumerate(self.conns):
                self._send(rank, conn, payload)
        except WorkerFailed as exc:
            self.failed = str(exc)
            raise
        self.submitted += 1
        return self.submitted

    def collect(self, ticket: int) -> torch.Tensor:
        """The oldest submitted step's result (``ticket`` must be that step's)."""
        if ticket != self.collected + 1:
            raise RuntimeError(f"steps are collected in the order submitted: expected {self.collected + 1}, "
                               f"got {ticket}")
        try:
            # Every worker answers, so an error anywhere surfaces and the group stays in lockstep.
            answers = [self._answer(rank, self.config.timeout_s + 5.0, "stepping")
                       for rank in range(len(self.conns))]
        except WorkerFailed as exc:
            self.failed = str(exc)
            raise
        self.collected = ticket
        return unpack_result(answers[self.output_rank])

    def _send(self, rank: int, conn: Connection, payload: bytes) -> None:
        try:
            conn.send_bytes(payload)
        except (OSError, ValueError) as exc:
            raise WorkerFailed(f"worker {rank} of {len(self.conns)} is gone ({exc})") from None

    def _answer(self, rank: int, timeout_s: float, doing: str):
        conn = self.conns[rank]
        try:
            if not conn.poll(timeout_s):
                raise WorkerFailed(f"worker {rank} of {len(self.conns)} gave no answer in {timeout_s:.0f} s "
                                   f"while {doing}")
            status, value = conn.recv()
        except (EOFError, OSError):
            code = self.procs[rank].exitcode
            raise WorkerFailed(f"worker {rank} of {len(self.conns)} died while {doing} (exit code {code})") from None
        if status == "error":
            raise WorkerFailed(f"worker {rank} of {len(self.conns)} failed while {doing}: {value}")
        return value

    def close(self) -> None:
        """Stop every worker (each leaves its process group); kill any that do not exit."""
        for conn in self.conns:
            try:
                conn.send_bytes(b"")
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
