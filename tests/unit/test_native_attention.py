"""The native paged decode-attention kernel (bf16 and fp32) against float64 attention computed by torch."""
from __future__ import annotations

import pytest
import torch

from tandem.engine import kernels
from tandem.engine.attention import AttentionMetadata, decode_attention, native_decode_applies

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernels")

BLOCK = 16


def _case(batch: int, heads: int, kv_heads: int, dim: int, lens: list[int], seed: int = 0,
          dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-n // BLOCK) for n in lens)
    num_blocks = blocks_needed + 7
    kv = torch.randn(2, num_blocks, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    # Scattered, non-monotonic block tables: the kernel must follow slots, not assume order.
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-n // BLOCK) for n in lens) * BLOCK
    slots = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lens):
        table = [order.pop() for _ in range(-(-n // BLOCK))]
        row = (torch.tensor(table)[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)
        slots[b, : row.numel()] = row
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    mask = (torch.arange(width)[None, :] < lens_t[:, None])[:, None, None, :]
    meta = AttentionMetadata(False, torch.zeros(batch, dtype=torch.long), (), slots, mask, lens_t)
    return q, kv, meta


def _reference(q, kv, meta, scale):
    """Plain float64 softmax attention over each sequence's gathered context."""
    heads, kv_heads = q.shape[1], kv.shape[-2]
    outs = []
    for b, n in enumerate(meta.context_lens.tolist()):
        idx = meta.context_slots[b, :n]
        k = kv[0].reshape(-1, kv_heads, kv.shape[-1])[idx].double().repeat_interleave(heads // kv_heads, 1)
        v = kv[1].reshape(-1, kv_heads, kv.shape[-1])[idx].double().repeat_interleave(heads // kv_heads, 1)
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[b].double() * scale, k), dim=-1)
        outs.append(torch.einsum("ht,thd->hd", weights, v))
    return torch.stack(outs)


@pytest.mark.parametrize("heads,kv_heads,dim,lens", [
    (9, 3, 64, [1, 15, 16, 17, 160, 33]),   # SmolLM2's heads, lengths around block edges
    (4, 4, 32, [5, 64]),                      # no grouping
    (8, 1, 128, [300]),                       # multi-query, one long context
    (10, 2, 16, [1, 40]),                     # 5 heads per KV head: a register group of 4, then 1
    (12, 2, 128, [33, 16]),                   # 6 per KV head at the widest register tile
    (4, 2, 8, [9, 30]),                       # one AVX2 vector per row
    (4, 1, 256, [20]),                        # 16 AVX-512 vectors per row; AVX2: the generic loop
    (6, 1, 24, [7, 50]),                      # a head dim off the vector paths: the generic loop
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_matches_float64_attention(heads, kv_heads, dim, lens, dtype) -> None:
    q, kv, meta = _case(len(lens), heads, kv_heads, dim, lens, dtype=dtype)
    scale = dim ** -0.5
    assert native_decode_applies(q, kv, meta)
    got = decode_attention(q, kv, meta, scale)
    assert got.dtype == dtype
    want = _reference(q, kv, meta, scale)
    # bf16 output: one rounding of a value of magnitude <= max|v| (about 4 here). fp32: sums of
    # a few hundred terms in fp32 and a vector expf within 4 ulp.
    tolerance = 4 * 2 ** -8 if dtype == torch.bfloat16 else 2e-5
    assert (got.double() - want).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2 ** -6), (torch.float32, 1e-5)],
                         ids=["bf16", "fp32"])
def test_kernel_agrees_with_the_sdpa_path(dtype, tolerance) -> None:
    q, kv, meta = _case(6, 9, 3, 64, [3, 40, 17, 64, 1, 90], seed=3, dtype=dtype)
    native = decode_attention(q, kv, meta, 0.125)
    fallback = decode_attention(q, kv, AttentionMetadata(False, meta.slot_mapping, (), meta.context_slots,
                                                         meta.context_mask, None), 0.125)
    assert (native.float() - fallback.float()).abs().max().item() <= tolerance


def test_kernel_rejects_a_length_beyond_its_slots() -> None:
    q, kv, meta = _case(2, 4, 2, 32, [5, 9])
    bad = AttentionMetadata(False, meta.slot_mapping, (), meta.context_slots, meta.context_mask,
                            torch.tensor([5, meta.context_slots.shape[1] + 1]))
    with pytest.raises(RuntimeError, match="rejected its inputs"):
        decode_attention(q, kv, bad, 0.1)


def test_mixed_dtypes_and_fp16_keep_the_sdpa_path() -> None:
    q, kv, meta = _case(2, 4, 2, 32, [5, 9])
    assert not native_decode_applies(q.float(), kv, meta)
    assert not native_decode_applies(q.half(), kv.half(), meta)
