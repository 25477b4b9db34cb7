"""Per-device memory of an instance: weights, activation workspace, and what is left for KV."""
from __future__ import annotations

import math

import msgspec

from .hardware import HardwareProfile
from .model_spec import DTYPE_BYTES, ModelSpec
from .policy import Policy


class InstanceMemory(msgspec.Struct, frozen=True):
    """Memory budget of the most loaded device of an instance with parallelism (tp, pp)."""

    usable_bytes: float  # device memory x utilisation
    weight_bytes: float
    workspace_bytes: float
    kv_tokens: int  # tokens of KV the whole instance can hold

    @property
    def fits_weights(self) -> bool:
        return self.weight_bytes + self.workspace_bytes < self.usable_bytes


def stage_weight_bytes(model: ModelSpec, dtype: str, tp: int, pp: int) -> float:
    """Weights on one device of the heaviest stage: its layers plus the embedding or LM head."""
    per_layer = model.layer_params * (model.layers / pp)
    if pp == 1:
        params = per_layer + model.embedding_params
    else:
        # Stage 0 holds the embedding, the last stage the LM head (a copy if tied): equal sizes.
        params = per_layer + model.vocab * model.hidden
        if model.learned_positions:
            params += model.max_positions * model.hidden
    return params * DTYPE_BYTES[dtype] / tp


def instance_memory(model: ModelSpec, hw: HardwareProfile, dtype: str, tp: int, pp: int,
                    policy: Policy) -> InstanceMemory:
    nbytes = DTYPE_BYTES[dtype]
    usable = hw.memory_bytes * policy.memory_utilization
    weights = stage_weight_bytes(model, dtype, tp, pp)
    # Peak activations of one layer for a full prefill batch (hidden states, QKV, FFN intermediate).
    workspace = policy.prefill_token_budget * (4 * model.hidden + 2 * model.ffn / tp) * nbytes
    kv_per_token_device = 2 * model.kv_dim * nbytes * (model.layers / pp) / tp
    free = usable - weights - workspace
    kv_tokens = max(0, int(free / kv_per_token_device)) if free > 0 else 0
    return InstanceMemory(usable_bytes=usable, weight_bytes=weights, workspace_bytes=workspace,
                          kv_tokens=kv_tokens)


def blocks_for(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)
