"""One worker of a tensor/pipeline-parallel instance: its model shard and its slice of the KV cache.

The controller (the instance's ``Engine``) keeps the scheduler and the block manager, the one
account of the instance's blocks, and sends every step to all its workers as ``StepInputs``; each
worker runs its shard over the same block ids in its own cache. ``WorkerConfig`` is everything a
worker needs, resolved by the controller so that every worker builds the same shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import msgspec
import torch

from tandem.engine import heap, hugepages
from tandem.engine.collective import Collective
from tandem.engine.config import load_config
from tandem.engine.fused import argmax_rows
from tandem.engine.parallel import Parallelism, WorkerShard
from tandem.engine.runner import DTYPES, ModelRunner, build_model, kv_cache_shape
from tandem.engine.step_inputs import StepInputs, split_inputs


# Fewest new tokens worth a micro-batch of their own. A decode batch is bound by reading the
# weights, which each micro-batch does again, so on CPU halves overlapped across two stages ran
# slower than the whole batch (64 x 32 tokens); a prefill's micro-batches pay
# (benchmarks/RESULTS.md, "Parallel instances").
MICRO_BATCH_MIN_TOKENS = 128


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    dtype: str  # a key of engine.runner.DTYPES, already resolved from "auto"
    device: str
    block_size: int
    num_blocks: int
    max_model_len: int
    parallelism: Parallelism
    timeout_s: float = 60.0  # bound on every collective and on the controller's wait for a step


class WorkerFailed(RuntimeError):
    """A worker of a parallel instance died, raised, or did not answer in time."""


class WorkerGroup(Protocol):
    """The controller's side of its workers: run a step on all of them, get the logits. ``submit``
    sends a step without waiting (workers run steps in the order sent, so pipeline stages can work
    on different steps at once) and ``collect`` takes the oldest one's result."""

    def run(self, inputs: StepInputs) -> torch.Tensor: ...

    def submit(self, inputs: StepInputs) -> Any: ...

    def collect(self, ticket: Any) -> torch.Tensor: ...

    def close(self) -> None: ...


WorkerGroupFactory = Callable[[WorkerConfig], WorkerGroup]


class ShardWorker:
    """Builds its shard and cache, then runs steps: ``run`` returns the logits on the output worker
    (the last stage's tp rank 0), None on the others."""

    def __init__(self, config: WorkerConfig, rank: int, comm: Collective,
                 kv_allocator: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> None:
        if config.device == "cpu":
            heap.keep_freed_memory()
        self.config = config
        self.comm = comm
        self.shard = WorkerShard(config.parallelism, rank)
        model_config = load_config(Path(config.model_dir))
        dtype = DTYPES[config.dtype]
        model = build_model(model_config, Path(config.model_dir), dtype, config.device,
                            config.max_model_len, self.shard, comm)
        shape = kv_cache_shape(model_config, config.num_blocks, config.block_size, self.shard)
        if kv_allocator is None:
            kv_allocator = hugepages.zeros if config.device == "cpu" else (
                lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=config.device))
        self.runner = ModelRunner(model, kv_allocator(tuple(shape), dtype), config.block_size)

    @property
    def kv_cache(self) -> torch.Tensor:
        """``[stage layers, 2, blocks, block_size, rank's KV heads, head_dim]``."""
        return self.runner.kv_cache

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """One step. With pipeline stages a batch large enough goes through as up to pp
        micro-batches, so stage s works on micro-batch i while stage s+1 works on micro-batch i-1."""
        pieces = split_inputs(inputs, self.shard.parallelism.pp, MICRO_BATCH_MIN_TOKENS)
        outputs = [self.runner.run_inputs(piece) for piece in pieces]
        self.comm.flush()
        if outputs[0] is None:
            return None
        logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return argmax_rows(logits) if inputs.greedy else logits


def pack_result(result: torch.Tensor | None) -> tuple | None:
    """A worker's step result as plain data for the trip to the controller."""
    if result is None:
        return None
    result = result.cpu().contiguous()
    return tuple(result.shape), str(result.dtype).removeprefix("torch."), result.numpy().tobytes()


def unpack_result(packed: tuple) -> torch.Tensor:
    shape, dtype, data = packed
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)
