"""KV capacity of a GPU engine from ``memory_fraction``: its share of the device's memory, less
the loaded weights and the activation peak of the largest step, measured (as vLLM does) by one
profiling prefill of ``max_num_batched_tokens`` tokens through a throwaway cache.

The device is read through a ``MemoryProbe`` (``CudaProbe`` on a GPU), so the arithmetic and the
profiling step run in tests without one.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from tandem.engine.block_manager import blocks_needed
from tandem.engine.runner import ModelRunner
from tandem.engine.step_inputs import StepInputs

GIB = float(1 << 30)


class MemoryProfile(NamedTuple):
    total_bytes: int  # the device's memory
    weights_bytes: int  # allocated once the model is loaded
    activation_peak_bytes: int  # the largest step's working memory on top of weights and cache


class MemoryProbe(Protocol):
    def total(self) -> int: ...
    def allocated(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...


class CudaProbe:
    """torch's accounting of one CUDA device (the one Ray's CUDA_VISIBLE_DEVICES leaves)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def kv_budget_bytes(memory_fraction: float, device_share: float, profile: MemoryProfile) -> int:
    """Bytes the KV cache may take: ``memory_fraction`` of this engine's ``device_share`` of the
    device (a fractional Ray GPU), less weights and activation peak. ValueError naming the numbers
    if nothing is left."""
    budget = memory_fraction * device_share * profile.total_bytes
    kv_bytes = int(budget - profile.weights_bytes - profile.activation_peak_bytes)
    if kv_bytes <= 0:
        raise ValueError(
            f"memory_fraction={memory_fraction:g} of a {device_share:g} share of a "
            f"{profile.total_bytes / GIB:.1f} GiB GPU is {budget / GIB:.2f} GiB: no room for a KV cache "
            f"after the weights ({profile.weights_bytes / GIB:.2f} GiB) and the largest step's activations "
            f"({profile.activation_peak_bytes / GIB:.2f} GiB); raise memory_fraction or num_gpus, or "
            "lower max_batch_tokens")
    return kv_bytes


def profile_memory(model, kv_shape_for, dtype: torch.dtype, device: str, block_size: int,
                   num_tokens: int, probe: MemoryProbe) -> MemoryProfile:
    """Weights as allocated now, then one prefill of ``num_tokens`` tokens through ``model`` with
    a cache just big enough (``kv_shape_for(num_blocks)``); the peak above weights and that cache
    is the activation peak. The cache is freed before returning."""
    weights = probe.allocated()
    num_blocks = blocks_needed(num_tokens, block_size)
    cache = torch.zeros(kv_shape_for(num_blocks), dtype=dtype, device=device)
    cache_bytes = cache.numel() * cache.element_size()
    probe.reset_peak()
    inputs = StepInputs("prefill", [0] * num_tokens, [num_tokens], [list(range(num_blocks))])
    ModelRunner(model, cache, block_size).run_inputs(inputs)
    peak = probe.peak()
    del cache
    return MemoryProfile(probe.total(), weights, max(0, peak - weights - cache_bytes))
