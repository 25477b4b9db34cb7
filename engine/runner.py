"""Model runner: owns the model and the KV cache; turns a StepPlan into tensors and logits."""
from __future__ import annotations

from pathlib import Path

import torch

from tandem.engine.collective import Collective
from tandem.engine.config import ModelConfig
from tandem.engine.kernel_linear import KernelLinear, kernel_linears_apply
from tandem.engine.layers import RotaryEmbedding, replace_linears
from tandem.engine.loader import load_weights
from tandem.engine.model import CausalLM
from tandem.engine.packed_linear import PackedLinear, packing_available
from tandem.engine.parallel import WorkerShard, kv_head_range, layer_range, single_worker
from tandem.engine.sampler import WorkerSampled
from tandem.engine.scheduler import StepPlan
from tandem.engine.step_inputs import StepInputs, model_inputs, step_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, config: ModelConfig, device: str) -> torch.dtype:
    """`auto` keeps fp32 checkpoints in fp32 and runs half-precision ones in bf16 (CPU has no fast fp16)."""
    if dtype == "auto":
        if config.torch_dtype in ("float32", "torch.float32"):
            return torch.float32
        return torch.bfloat16 if device == "cpu" else DTYPES.get(config.torch_dtype, torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def build_model(
    config: ModelConfig, model_dir: Path, dtype: torch.dtype, device: str, max_positions: int,
    shard: WorkerShard | None = None, comm: Collective | None = None,
) -> CausalLM:
    """The model (one worker's shard of it, for a parallel instance) with its weights loaded."""
    # Build on the meta device: random initialisation of every weight would only be overwritten.
    with torch.device("meta"):
        model = CausalLM(config, max_positions, shard, comm)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings and model.shard.is_first_stage and model.shard.is_last_stage:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = RotaryEmbedding(config, max_positions).to(device)
    load_weights(model, model_dir)
    if kernel_linears_apply(dtype, device):
        replace_linears(model, KernelLinear)
    elif packing_available(dtype, device):
        replace_linears(model, PackedLinear)
    return model.eval()


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int,
                   shard: WorkerShard | None = None) -> tuple[int, ...]:
    """One worker's cache: its stage's layers and its tp rank's KV heads (all of both by default)."""
    shard = shard or single_worker()
    par = shard.parallelism
    layers = len(layer_range(config.num_layers, par.pp, shard.pp_rank))
    kv_heads = len(kv_head_range(config.num_kv_heads, par.tp, shard.tp_rank))
    return (layers, 2, num_blocks, block_size, kv_heads, config.head_dim)


class ModelRunner:
    """Runs one step: turns the plan into inputs, builds slot indices once, calls the model."""

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int,
                 tables: dict[str, list[int]] | None = None) -> None:
        """``tables``: the block manager's block tables, for ``run(plan)``; a worker of a parallel
        instance has none and gets the tables inside each step's inputs."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.tables = tables
        self.device = kv_cache.device

    def run(self, plan: StepPlan) -> torch.Tensor:
        return self.run_inputs(step_inputs(plan, self.tables))

    @torch.inference_mode()
    def run_inputs(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's logits (None on a worker of a parallel instance that does not hold them)."""
        ids, positions, meta, logits_index = model_inputs(inputs, self.block_size, self.device)
        return self.model(ids, positions, self.kv_cache, meta, logits_index)


class GroupRunner:
    """The controller's runner for a parallel instance: each step's inputs go to its workers
    (``engine/worker.py``), which hold the model and the KV cache; the logits come back."""

    def __init__(self, group, tables: dict[str, list[int]]) -> None:
        self.group = group
        self.tables = tables

    def run(self, plan: StepPlan) -> torch.Tensor | WorkerSampled:
        """The step's logits, or, when every request samples greedily without logprobs, the
        tokens the output worker chose (only those cross to the controller)."""
        return self.collect(self.submit(plan))

    def submit(self, plan: StepPlan) -> tuple:
        """Send the step to the workers without waiting for it; ``collect`` its result (in order)."""
        greedy = all(s.params.greedy and not s.params.logprobs for s in plan.seqs)
        return self.group.submit(step_inputs(plan, self.tables, greedy)), greedy

    def collect(self, submitted: tuple) -> torch.Tensor | WorkerSampled:
        ticket, greedy = submitted
        result = self.group.collect(ticket)
        return WorkerSampled(result.tolist()) if greedy else result

    @property
    def kv_cache(self):
        """What the instance's transports take as its cache: the group's description of its
        sharded cache (the KV itself lives on the workers, one shard each)."""
        cache = getattr(self.group, "kv_cache", None)
        if cache is None:
            raise RuntimeError("this tensor/pipeline-parallel engine's KV cache lives on its worker "
                               "processes, one shard each, and cannot be transferred")
        return cache

    def close(self) -> None:
        self.group.close()
