"""A GPU engine's KV capacity from ``memory_fraction`` (engine/memory.py): its share of the device,
less the loaded weights and the activation peak of a profiled largest step. The arithmetic and the
profiling step run here with a scripted memory probe; the real device is in the gpu-marked test."""
from __future__ import annotations

import pytest

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.memory import GIB, MemoryProfile, kv_budget_bytes
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig
from tests.reference import hf_greedy

MIB = 1 << 20


def test_the_kv_budget_is_the_fraction_of_the_share_less_weights_and_activations():
    profile = MemoryProfile(total_bytes=80 * (1 << 30), weights_bytes=15 * (1 << 30),
                            activation_peak_bytes=2 * (1 << 30))
    assert kv_budget_bytes(0.9, 1.0, profile) == int(0.9 * 80 * GIB) - 17 * (1 << 30)  # 55 GiB
    assert kv_budget_bytes(0.9, 0.5, profile) == int(0.45 * 80 * GIB) - 17 * (1 << 30)  # half a GPU: 19 GiB
    with pytest.raises(ValueError, match=r"memory_fraction=0.2 of a 0.5 share of a 80.0 GiB GPU is 8.00 GiB: "
                                         r"no room for a KV cache after the weights \(15.00 GiB\)"):
        kv_budget_bytes(0.2, 0.5, profile)


class ScriptedProbe:
    """A device whose allocations the test scripts: ``weights`` once the model is loaded, and a
    peak during the profiling step of the cache it allocated plus ``activations``."""

    def __init__(self, total: int, weights: int, activations: int) -> None:
        self.total_bytes, self.weights, self.activations = total, weights, activations
        self.resets = 0
        self.cache_bytes = 0

    def total(self) -> int:
        return self.total_bytes

    def allocated(self) -> int:
        return self.weights

    def reset_peak(self) -> None:
        self.resets += 1

    def peak(self) -> int:
        return self.weights + self.cache_bytes + self.activations


def test_an_engine_sized_by_memory_fraction_profiles_a_step_then_fills_what_is_left(tiny_llama_dir, monkeypatch):
    """The measured path of Engine, run on CPU through a scripted probe: one profiling prefill of
    max_num_batched_tokens through a throwaway cache, then as many blocks as the budget holds; the
    engine then serves normally."""
    import tandem.engine.memory as memory

    probe = ScriptedProbe(total=64 * MIB, weights=8 * MIB, activations=4 * MIB)
    runs: list[int] = []
    real_runner = memory.ModelRunner

    class CountingRunner(real_runner):
        def run_inputs(self, inputs):
            runs.append(len(inputs.token_ids))
            probe.cache_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
            return super().run_inputs(inputs)

    monkeypatch.setattr(memory, "ModelRunner", CountingRunner)
    config = EngineConfig(dtype="float32", block_size=4, memory_fraction=0.5, device_share=0.5,
                          scheduler=SchedulerConfig(max_num_batched_tokens=40))
    engine = Engine(tiny_llama_dir, config, memory_probe=probe)
    assert runs == [40] and probe.resets == 1  # one profiling step of the largest batch
    budget = int(0.5 * 0.5 * 64 * MIB) - 8 * MIB - 4 * MIB  # 4 MiB for KV
    assert engine.blocks.num_blocks == budget // engine.block_bytes
    assert engine.runner.kv_cache.numel() * 4 == engine.blocks.num_blocks * engine.block_bytes
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "r")
    tokens = [t for _ in range(6) for d in engine.step() for t in d.token_ids]
    assert tokens == hf_greedy(tiny_llama_dir, [[5, 6, 7, 8]], 6)[0]  # it serves as sized
    with pytest.raises(ValueError, match="no room for a KV cache"):
        Engine(tiny_llama_dir, EngineConfig(dtype="float32", memory_fraction=0.1,
                                            scheduler=SchedulerConfig(max_num_batched_tokens=40)),
               memory_probe=ScriptedProbe(total=64 * MIB, weights=8 * MIB, activations=4 * MIB))


@pytest.mark.gpu
def test_a_cuda_engine_sized_by_memory_fraction_fits_its_share(tiny_llama_dir):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    config = EngineConfig(dtype="float32", device="cuda", memory_fraction=0.05,
                          scheduler=SchedulerConfig(max_num_batched_tokens=512))
    engine = Engine(tiny_llama_dir, config)
    kv_bytes = engine.blocks.num_blocks * engine.block_bytes
    assert 0 < kv_bytes <= 0.05 * total
    assert torch.cuda.memory_allocated() <= 0.05 * total + engine.block_bytes
