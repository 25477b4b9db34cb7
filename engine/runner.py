"""Model runner: owns the model and the KV cache; turns a StepPlan into tensors and logits."""
from __future__ import annotations

from pathlib import Path

import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import ModelConfig
from tandem.engine.kernel_linear import KernelLinear, kernel_linears_apply
from tandem.engine.layers import RotaryEmbedding, replace_linears
from tandem.engine.loader import load_weights
from tandem.engine.model import CausalLM
from tandem.engine.packed_linear import PackedLinear, packing_available
from tandem.engine.scheduler import StepPlan

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
    config: ModelConfig, model_dir: Path, dtype: torch.dtype, device: str, max_positions: int
) -> CausalLM:
    # Build on the meta device: random initialisation of every weight would only be overwritten.
    with torch.device("meta"):
        model = CausalLM(config, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = RotaryEmbedding(config, max_positions).to(device)
    load_weights(model, model_dir)
    if kernel_linears_apply(dtype, device):
        replace_linears(model, KernelLinear)
    elif packing_available(dtype, device):
        replace_linears(model, PackedLinear)
    return model.eval()


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)


class ModelRunner:
    """Runs one step: packs the plan's tokens, builds slot indices once, calls the model."""

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, blocks: BlockManager) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = kv_cache.device

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        if plan.kind == "prefill":
            inputs = self._prefill_inputs(plan)
        else:
            inputs = self._decode_inputs(plan)
        return self.model(*inputs)

    def _slots(self, request_id: str, start: int, end: int) -> torch.Tensor:
        table = torch.tensor(self.blocks.tables[request_id], dtype=torch.long)
        size = self.blocks.block_size
        slots = (table[:, None] * size + torch.arange(size)).reshape(-1)
        return slots[start:end]

    def _prefill_inputs(self, plan: StepPlan):
        seqs = plan.seqs
        ids = [t for s in seqs for t in s.token_ids]
        lens = tuple(s.num_tokens for s in seqs)
        positions = torch.cat([torch.arange(n) for n in lens])
        slots = torch.cat([self._slots(s.request_id, 0, s.num_tokens) for s in seqs])
        last = torch.tensor(lens).cumsum(0) - 1
        meta = AttentionMetadata(True, slots.to(self.device), lens)
        return (torch.tensor(ids, device=self.device), positions.to(self.device),
                self.kv_cache, meta, last.to(self.device))

    def _decode_inputs(self, plan: StepPlan):
        seqs = plan.seqs
        size = self.blocks.block_size
        lens = torch.tensor([s.num_tokens for s in seqs])
        width = max(len(self.blocks.tables[s.request_id]) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            table = self.blocks.tables[seq.request_id]
            tables[row, : len(table)] = torch.tensor(table)
        slots = (tables[:, :, None] * size + torch.arange(size)).reshape(len(seqs), -1)
        max_len = int(lens.max())
        context = slots[:, :max_len].contiguous()
        mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]
        positions = lens - 1
        new_slots = context.gather(1, positions[:, None]).squeeze(1)
        meta = AttentionMetadata(False, new_slots.to(self.device), (), context.to(self.device),
                                 mask.to(self.device), lens.to(self.device))
        ids = torch.tensor([s.last_token for s in seqs], device=self.device)
        return (ids, positions.to(self.device), self.kv_cache, meta,
                torch.arange(len(seqs), device=self.device))
