"""The communication a model shard needs: the tp group's all-reduce and logits gather, and the
hand-off of activations from one pipeline stage to the next.

``Solo`` is the single-worker case (every call is the identity or a no-op, so a (1, 1) model pays
nothing). ``DistributedCollective`` runs over ``torch.distributed`` (gloo on CPU, NCCL on CUDA),
initialised in the worker's own process from a rendezvous address; every collective is bounded by
the process group's timeout, so a dead peer fails the step instead of hanging it.
"""
from __future__ import annotations

import datetime
from typing import Protocol

import torch

from tandem.engine.parallel import WorkerShard


class Collective(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the tp group, in place; returns it."""

    def gather_columns(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        """Concatenate each tp rank's ``[rows, widths[rank]]`` along the columns, on tp rank 0 (None
        elsewhere)."""

    def send_next(self, tensor: torch.Tensor) -> None:
        """Hand activations to the next pipeline stage (may return before they are delivered)."""

    def flush(self) -> None:
        """Wait until every activation handed on has been delivered."""

    def recv_prev(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Activations from the previous pipeline stage (dtype and device of ``like``)."""


class Solo:
    """One worker: nothing to reduce, gather or hand off."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_columns(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        return tensor

    def send_next(self, tensor: torch.Tensor) -> None:
        raise RuntimeError("a single-worker model has no next pipeline stage")

    def flush(self) -> None:
        return None

    def recv_prev(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a single-worker model has no previous pipeline stage")


class DistributedCollective:
    """torch.distributed groups for one worker of a (tp, pp) instance: the default group spans
    every worker (pipeline sends address global ranks); one subgroup per stage carries its tp
    collectives."""

    def __init__(self, shard: WorkerShard, init_method: str, timeout_s: float, backend: str = "gloo") -> None:
        import torch.distributed as dist

        par = shard.parallelism
        self.dist = dist
        self.shard = shard
        dist.init_process_group(backend, init_method=init_method, rank=shard.rank,
                                world_size=par.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        # Every process must create every subgroup, in the same order.
        groups = [dist.new_group([par.rank(t, stage) for t in range(par.tp)]) for stage in range(par.pp)]
        self.tp_group = groups[shard.pp_rank]
        self.tp_root = par.rank(0, shard.pp_rank)
        self._sends: list = []  # (request, tensor) of activations handed on, not yet delivered

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.shard.parallelism.tp > 1:
            self.dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def gather_columns(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        if self.shard.parallelism.tp == 1:
            return tensor
        # Gather needs equal shapes: pad each rank's columns to the widest.
        padded = torch.zeros(tensor.shape[0], max(widths), dtype=tensor.dtype, device=tensor.device)
        padded[:, : tensor.shape[1]] = tensor
        is_root = self.shard.tp_rank == 0
        parts = [torch.empty_like(padded) for _ in widths] if is_root else None
        self.dist.gather(padded, parts, dst=self.tp_root, group=self.tp_group)
        if not is_root:
            return None
        return torch.cat([part[:, :width] for part, width in zip(parts, widths)], dim=1)

    def send_next(self, tensor: torch.Tensor) -> None:
        """Asynchronous: this stage goes on to its next micro-batch while the send completes."""
        par = self.shard.parallelism
        tensor = tensor.contiguous()  # kept alive, with its request, until flush
        self._sends.append((self.dist.isend(tensor, dst=par.rank(self.shard.tp_rank, self.shard.pp_rank + 1)),
                            tensor))

    def flush(self) -> None:
        sends, self._sends = self._sends, []
        for work, _ in sends:
            work.wait()

    def recv_prev(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        par = self.shard.parallelism
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.dist.recv(out, src=par.rank(self.shard.tp_rank, self.shard.pp_rank - 1))
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
