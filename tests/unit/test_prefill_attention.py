"""Prefill attention over packed sequences (engine/attention.py) against a float64 formula."""
from __future__ import annotations

import math

import pytest
import torch

from tandem.engine import attention, kernels
from tandem.engine.attention import prefill_attention


def _reference(q, k, v, lens, scale):
    """Causal softmax attention of each sequence alone, query head h on KV head h // group."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out)


def test_runs_of_equal_lengths_and_single_sequences_attend_only_to_their_own_prefix() -> None:
    torch.manual_seed(0)
    lens = (3, 5, 5, 5, 2, 7, 7, 1)  # runs of one length batched together, others alone
    heads, kv_heads, dim = 6, 2, 16
    fused = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim)  # strided views, as the model has
    q = fused[:, :heads * dim].view(-1, heads, dim)
    k = fused[:, heads * dim:(heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
    got = prefill_attention(q, k, v, lens, dim**-0.5)
    assert got.shape == (sum(lens), heads, dim)
    torch.testing.assert_close(got.double(), _reference(q, k, v, lens, dim**-0.5), rtol=1e-5, atol=1e-5)


def _fused(lens, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    """q, k, v as strided views of one fused projection, as the model has them."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q = fused[:, :heads * dim].view(-1, heads, dim)
    k = fused[:, heads * dim:(heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
    return q, k, v


needs_kernel = pytest.mark.skipif(not kernels.available() or attention._prefill_lanes() == 0,
                                  reason="no native prefill kernel here (no compiler or no AVX2/AVX-512)")


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,lens", [
    (9, 3, 64, (128, 1, 31, 32, 33, 5)),    # SmolLM2's heads; lengths around the 32-token blocks
    (4, 4, 32, (100, 2)),                   # no grouping
    (8, 2, 128, (70,)),                     # 4 query heads per KV head, 8 or 16 vectors a row
    (2, 1, 16, (257, 64)),                  # a long prompt: many key blocks, a ragged last one
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_kernel_matches_float64_attention(heads, kv_heads, dim, lens, dtype) -> None:
    q, k, v = _fused(lens, heads, kv_heads, dim, dtype)
    assert attention.native_prefill_applies(q, k, v)
    got = prefill_attention(q, k, v, lens, dim**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    want = _reference(q, k, v, lens, dim**-0.5)
    # fp32: sums of a few hundred terms and a vector expf within 4 ulp; bf16: one rounding of the
    # output (|v| <= ~4.5).
    tolerance = 2e-5 if dtype == torch.float32 else 4 * 2 ** -8
    assert (got.double() - want).abs().max().item() <= tolerance


@needs_kernel
def test_a_nan_stays_in_its_own_sequence_and_kv_head() -> None:
    lens = (40, 40)
    q, k, v = _fused(lens, 4, 2, 32)
    v[45, 1, 3] = float("nan")  # the second sequence's token 5, KV head 1 (query heads 2 and 3)
    got = prefill_attention(q, k, v, lens, 0.2)
    assert not got[:40].isnan().any() and not got[40:, :2].isnan().any()
    assert got[45:, 2:, 3].isnan().all()  # (its tokens 0-4 too, as in SDPA: 0 * NaN)


@needs_kernel
def test_native_kernel_rejects_lengths_that_do_not_cover_the_batch() -> None:
    q, k, v = _fused((10, 6), 4, 2, 32)
    with pytest.raises(ValueError, match="sum to 15, q has 16 tokens"):
        prefill_attention(q, k, v, (10, 5), 0.2)


def test_fp16_mixed_dtypes_and_odd_head_dims_keep_the_sdpa_path() -> None:
    q, k, v = _fused((5, 3), 4, 2, 32)
    assert not attention.native_prefill_applies(q.half(), k.half(), v.half())
    assert not attention.native_prefill_applies(q, k.bfloat16(), v.bfloat16())
    q, k, v = _fused((5, 3), 4, 2, 24)
    assert not attention.native_prefill_applies(q, k, v)
    torch.testing.assert_close(prefill_attention(q, k, v, (5, 3), 0.2).double(),
                               _reference(q, k, v, (5, 3), 0.2), rtol=1e-5, atol=1e-5)


# -- chunked prefill: chunks attend to their prompt's cached prefix too -------------------------


def _chunk_reference(q, keys, values, lens, prefixes, scale):
    """Each chunk alone in float64: query i of a chunk after `p` cached tokens sees keys 0..p + i."""
    group = q.shape[1] // keys.shape[1]
    out, q0, k0 = [], 0, 0
    for n, p in zip(lens, prefixes):
        qs = q[q0:q0 + n].double()
        ks, vs = (t[k0:k0 + p + n].double().repeat_interleave(group, dim=1) for t in (keys, values))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        hidden = torch.arange(p + n)[None, :] > p + torch.arange(n)[:, None]
        out.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, -math.inf).softmax(-1), vs))
        q0, k0 = q0 + n, k0 + p + n
    return torch.cat(out)


def _paged_chunks(chunks, heads, kv_heads, dim, dtype, block_size=16, seed=1):
    """A random paged cache, each (prefix, chunk) sequence in scattered blocks; q of the chunks and
    the packed context slots, as a mixed step's metadata has them."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(p + n) // block_size) for p, n in chunks]
    kv_layer = torch.randn(2, sum(need) + 3, block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(sum(need) + 3, generator=gen)
    slots, used = [], 0
    for (p, n), blocks in zip(chunks, need):
        table = order[used:used + blocks]
        used += blocks
        slots.append((table[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:p + n])
    q = torch.randn(sum(n for _, n in chunks), heads, dim, generator=gen).to(dtype)
    return q, kv_layer, torch.cat(slots)


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunks_attend_to_their_cached_prefix(native, dtype, monkeypatch) -> None:
    if native and (not kernels.available() or attention._prefill_lanes() == 0):
        pytest.skip("no native prefill kernel here")
    if not native:
        monkeypatch.setattr(attention, "native_prefill_applies", lambda *a: False)
    # prefixes on and around the kernel's 32-key blocks and the cache's 16-token blocks
    chunks = [(0, 40), (15, 1), (16, 17), (31, 33), (100, 5), (1, 64)]
    heads, kv_heads, dim = 9, 3, 64
    q, kv_layer, context = _paged_chunks(chunks, heads, kv_heads, dim, dtype)
    lens, prefixes = tuple(n for _, n in chunks), tuple(p for p, _ in chunks)
    got = attention.chunk_attention(q, kv_layer, lens, prefixes, context, dim**-0.5)
    keys = kv_layer[0].view(-1, kv_heads, dim)[context]
    values = kv_layer[1].view(-1, kv_heads, dim)[context]
    want = _chunk_reference(q, keys, values, lens, prefixes, dim**-0.5)
    tolerance = 2e-5 if dtype == torch.float32 else 4 * 2 ** -8
    assert got.dtype == dtype and (got.double() - want).abs().max().item() <= tolerance
