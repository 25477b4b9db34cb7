"""Paged attention over the block-addressed KV cache.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
A token's *slot* is ``block_id * block_size + offset``; the scheduler's block tables become slot
indices once per step (``AttentionMetadata``) and every layer reuses them.

A whole-prompt prefill attends over the step's own fresh K/V, so it never reads the cache: on CPU
with the native kernel, otherwise SDPA. Decode reads each sequence's context through its slots: on
CPU (bf16 or fp32) with the native kernel (``engine.kernels``), which reads every cached row once;
otherwise by gathering the context (index_select) and running SDPA.

A chunked-prefill step (``mixed_attention``) holds decodes first (one token each, decode attention)
and then prompt chunks: a chunk whose prompt started in an earlier step attends to that prompt's
cached prefix as well as to its own tokens, so its whole context is gathered from the cache (after
the step's K/V is written) for the same native kernel, or SDPA with an offset causal mask.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tandem.engine import kernels


# What the native kernels (prefill and decode) take; fp32 math either way.
NATIVE_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step indexing shared by all layers. Tensors live on the model's device."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    seq_lens: tuple[int, ...]  # prefill: new tokens per sequence (packed in order)
    context_slots: torch.Tensor | None = None  # decode: [B, Lmax] slots of each context
    context_mask: torch.Tensor | None = None  # decode: [B, 1, 1, Lmax] True where valid
    context_lens: torch.Tensor | None = None  # decode: [B] int64 tokens in each context
    # Chunked prefill (a mixed step): the first ``num_decodes`` tokens are decodes (``context_*``
    # describe them); ``seq_lens`` are the chunks after them, ``prefix_lens`` each chunk's tokens
    # already cached before this step, ``chunk_context`` the slots of each chunk's whole context
    # (prefix + chunk, packed) when some prefix is not empty.
    num_decodes: int = 0
    prefix_lens: tuple[int, ...] = ()
    chunk_context: torch.Tensor | None = None


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new tokens' K/V ([T, Hkv, D]) at their slots."""
    k_flat = kv_layer[0].view(-1, *k.shape[1:])
    v_flat = kv_layer[1].view(-1, *v.shape[1:])
    k_flat.index_copy_(0, slots, k)
    v_flat.index_copy_(0, slots, v)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: tuple[int, ...], scale: float
) -> torch.Tensor:
    """Causal attention per packed sequence. q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D].

    On CPU (bf16 or fp32) the native kernel where it takes the head dim; otherwise SDPA, where
    consecutive sequences of one length go through as one batch: the same per-sequence result, bit
    for bit, in a fraction of the calls (faster: benchmarks/RESULTS.md, "engine/attention.py")."""
    if native_prefill_applies(q, k, v):
        return native_prefill_attention(q, k, v, seq_lens, scale)
    outputs = []
    start = 0
    for length, group in itertools.groupby(seq_lens):
        count = len(list(group))
        end = start + length * count
        qs, ks, vs = (t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        outputs.append(out.transpose(1, 2).reshape(length * count, *q.shape[1:]))
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def native_prefill_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """bf16 or fp32 on CPU, one dtype, rows of heads with unit strides (views of the fused
    projection are fine), a head dim of 1, 2, 4, 8 or 16 vectors, and the kernel built."""
    if q.dtype not in NATIVE_DTYPES or q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype):
        return False
    dim = q.shape[-1]
    if any(t.stride()[1:] != (dim, 1) for t in (q, k, v)) or k.stride() != v.stride():
        return False
    lanes = _prefill_lanes()
    return lanes > 0 and dim % lanes == 0 and dim // lanes in (1, 2, 4, 8, 16)


def _prefill_lanes() -> int:
    return kernels.load().prefill_attention_lanes() if kernels.available() else 0


@functools.lru_cache(maxsize=64)
def _packed_lengths(seq_lens: tuple[int, ...], prefix_lens: tuple[int, ...] | None = None) -> tuple:
    """The kernel's int64 arrays (query starts, query lengths, key starts, prefix lengths) for
    packed queries and, with prefixes, keys packed as each sequence's whole context: once per
    step, not once per layer."""
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    if prefix_lens is None:
        return starts, lens, starts, torch.zeros_like(lens)
    offsets = torch.tensor(prefix_lens, dtype=torch.int64)
    contexts = lens + offsets
    return starts, lens, torch.cumsum(contexts, 0) - contexts, offsets


def native_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: tuple[int, ...], scale: float,
    prefix_lens: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The native kernel (engine/kernels/prefill_attention.cpp) on strided q/k/v rows. Without
    ``prefix_lens`` k/v are the queries' own tokens; with them, each sequence's whole context."""
    tokens, heads, dim = q.shape
    if sum(seq_lens) != tokens:
        raise ValueError(f"prefill attention: sequence lengths sum to {sum(seq_lens)}, q has {tokens} tokens")
    keys = tokens + (sum(prefix_lens) if prefix_lens is not None else 0)
    if k.shape[0] != keys:
        raise ValueError(f"prefill attention: k has {k.shape[0]} rows for {keys} keys")
    out = torch.empty(tokens, heads, dim, dtype=q.dtype)
    starts, lens, kv_starts, offsets = _packed_lengths(tuple(seq_lens), prefix_lens)
    status = kernels.load().prefill_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(), lens.data_ptr(),
        kv_starts.data_ptr(), offsets.data_ptr(), len(seq_lens), heads, k.shape[1], dim, q.stride(0),
        k.stride(0), scale, q.dtype == torch.bfloat16, torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"prefill attention rejected its inputs (status {status}): q {tuple(q.shape)}, "
                           f"k {tuple(k.shape)}, sequence lengths {seq_lens}")
    return out


def chunk_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, seq_lens: tuple[int, ...], prefix_lens: tuple[int, ...],
    context: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention of prompt chunks over their cached prefix and themselves (their K/V already
    written). q: [T, H, D] packed chunks; ``context``: the slots of each chunk's prefix and chunk,
    packed. Query i of a chunk with prefix p sees the context's keys 0..p + i."""
    num_kv_heads, head_dim = kv_layer.shape[-2:]
    keys = kv_layer[0].view(-1, num_kv_heads, head_dim).index_select(0, context)
    values = kv_layer[1].view(-1, num_kv_heads, head_dim).index_select(0, context)
    if native_prefill_applies(q, keys, values):
        return native_prefill_attention(q, keys, values, seq_lens, scale, prefix_lens)
    outputs, q_start, k_start = [], 0, 0
    for n, prefix in zip(seq_lens, prefix_lens):
        qs = q[q_start:q_start + n].transpose(0, 1)[None]
        ks, vs = (t[k_start:k_start + prefix + n].transpose(0, 1)[None] for t in (keys, values))
        visible = torch.arange(prefix + n, device=q.device)[None, :] <= prefix + torch.arange(n, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=scale, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
        q_start, k_start = q_start + n, k_start + prefix + n
    return torch.cat(outputs, dim=0)


def step_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """A step's attention, its K/V already written: decode, whole prompts, or a mixed step."""
    if not meta.is_prefill:
        return decode_attention(q, kv_layer, meta, scale)
    if meta.num_decodes == 0 and meta.chunk_context is None:
        return prefill_attention(q, k, v, meta.seq_lens, scale)
    return mixed_attention(q, k, v, kv_layer, meta, scale)


def mixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Decodes (the first ``num_decodes`` tokens) through decode attention, the prompt chunks after
    them over their cached prefixes (or, where none has one, over their own fresh K/V)."""
    d = meta.num_decodes
    parts = [decode_attention(q[:d], kv_layer, meta, scale)] if d else []
    if meta.seq_lens:
        if meta.chunk_context is None:
            parts.append(prefill_attention(q[d:], k[d:], v[d:], meta.seq_lens, scale))
        else:
            parts.append(chunk_attention(q[d:], kv_layer, meta.seq_lens, meta.prefix_lens,
                                         meta.chunk_context, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query token per sequence. q: [B, H, D] -> [B, H, D]."""
    assert meta.context_slots is not None and meta.context_mask is not None
    if native_decode_applies(q, kv_layer, meta):
        return native_decode_attention(q, kv_layer, meta, scale)
    num_kv_heads, head_dim = kv_layer.shape[-2:]
    slots = meta.context_slots.reshape(-1)
    batch, length = meta.context_slots.shape
    keys = kv_layer[0].view(-1, num_kv_heads, head_dim).index_select(0, slots)
    values = kv_layer[1].view(-1, num_kv_heads, head_dim).index_select(0, slots)
    keys = keys.view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    values = values.view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=meta.context_mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def native_decode_applies(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> bool:
    """bf16 or fp32 on CPU, q and cache of one dtype, a contiguous cache, and the kernel built.
    (fp32 math either way: the fp32 parity tests against transformers run through it.)"""
    return (q.dtype in NATIVE_DTYPES and q.device.type == "cpu" and kv_layer.dtype == q.dtype
            and meta.context_lens is not None and kv_layer.is_contiguous() and kernels.available())


def native_decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The native kernel over the paged cache (engine/kernels/paged_attention.cpp)."""
    slots, lens = meta.context_slots.contiguous(), meta.context_lens.contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    batch, heads, head_dim = q.shape
    lib = kernels.load()
    kernel = lib.paged_decode_attention_bf16 if q.dtype == torch.bfloat16 else lib.paged_decode_attention_f32
    status = kernel(
        q.data_ptr(), kv_layer[0].data_ptr(), kv_layer[1].data_ptr(), slots.data_ptr(),
        lens.data_ptr(), out.data_ptr(), batch, heads, kv_layer.shape[-2], head_dim,
        slots.shape[1], scale, torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"paged decode attention rejected its inputs (status {status}): "
                           f"q {tuple(q.shape)}, kv heads {kv_layer.shape[-2]}, slots {tuple(slots.shape)}")
    return out
