"""Messages that move a request between instances (prefill -> decode, decode -> decode).

Plain msgspec structs: everything but the KV itself, which moves through a transport.
"""
from __future__ import annotations

from typing import Any

import msgspec

from engine.params import SamplingParams


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of one KV block: the unit transports move. ``dtype`` is a torch dtype name."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Per-block slice of the cache ``[L, 2, blocks, block_size, Hkv, D]`` (blocks axis = 2)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)


class KVHandle(msgspec.Struct, frozen=True):
    """A request's exported KV: what a destination needs to fetch it.

    ``payload`` is transport-specific (an object-store reference, a shared-memory name, ...);
    it never carries the tensor bytes inline through the control plane.
    """

    transport: str
    request_id: str
    num_tokens: int  # tokens whose KV is exported (all but the newest sampled token)
    num_blocks: int
    layout: KVLayout
    payload: Any = None
    node_id: str = ""


class RequestState(msgspec.Struct, frozen=True):
    """Everything but the KV that a request needs to continue decoding elsewhere."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    rng_state: bytes | None  # torch.Generator state: sampling continues the same stream
    prefix_offset: int
    read_offset: int
    text: str
    logprobs: list[float]
    num_preemptions: int = 0
